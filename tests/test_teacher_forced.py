"""Teacher-forced acceptance (τ_tf): the one decode loop held to the reference's continuation.

The independent reference is a hand count: along the teacher text, a step at position i keeps the
leading drafts that equal the teacher's tokens *and* the verifier's argmax there, where the
verifier's argmax at every teacher position comes from one teacher-forced forward over the whole
text (fidelity.teacher_forced_logprobs), not from the loop's verify steps.
"""
from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from quasar_bench.decode import generate, greedy_continuation
from quasar_bench.drafters import Draft, Drafter
from quasar_bench.errors import QuasarError
from quasar_bench.fidelity import teacher_forced_logprobs
from quasar_bench.models import TINY_CONFIGS, LoadedModel, random_hf_model
from quasar_bench.runtime import native_from_hf
from quasar_bench.verifiers import build_verifier

V, K = 64, 4
PROMPT = [5, 17, 9, 3, 42, 7, 5, 17, 9, 3, 8]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    hf = random_hf_model({**TINY_CONFIGS["tiny_llama"], "initializer_range": 0.3}, V, torch.float32, "cpu", 0)
    return LoadedModel("tiny", native_from_hf(hf, 256), None, [], False)


class Oracle(Drafter):
    """Proposes a fixed text from the generated position on, every third token corrupted: a
    deterministic function of the position only, so a hand count can replay it."""
    name = "test_oracle"

    def __init__(self, text, prompt_len):
        self.text, self.prompt_len, self.k = list(text), prompt_len, K
        self.replays, self.cache_room, self.forces_acceptance, self.drafts = None, 0, False, True

    def proposal(self, pos: int, k: int) -> list[int]:
        return [(t + 1) % V if (pos + j) % 3 == 1 else t for j, t in enumerate(self.text[pos:pos + k])]

    def propose(self, context, k):
        return Draft(tokens=self.proposal(len(context) - self.prompt_len, k))


def hand_count(teacher, verifier_argmax, drafter) -> list[int]:
    """Kept drafts per step along the teacher text (the loop's room rule: at most k, and never
    the teacher's last token, which the step's own token supplies)."""
    i, steps = 0, []
    while i < len(teacher):
        draft = drafter.proposal(i, min(K, len(teacher) - i - 1))
        m = 0
        while m < len(draft) and draft[m] == teacher[i + m] == verifier_argmax[i + m]:
            m += 1
        steps.append(m)
        i += m + 1
    return steps


@pytest.mark.parametrize("vc", [dict(name="int8"), dict(name="int4", group_size=32)])
def test_teacher_forced_acceptance_equals_the_hand_count(tiny, vc):
    ver = build_verifier(tiny, OmegaConf.create(vc), None)
    teacher = greedy_continuation(tiny.runtime, PROMPT, 40)
    argmax = teacher_forced_logprobs(ver, PROMPT, teacher).argmax(-1).tolist()
    drafter = Oracle(teacher, len(PROMPT))
    res = generate(ver, drafter, PROMPT, 40, K, teacher=teacher)
    assert res.output_ids == teacher  # the text is the teacher's whatever the verifier says
    assert res.step_accepted == hand_count(teacher, argmax, drafter)
    assert res.accepted > 0
    # the verifier's own disagreements with the reference cost acceptance: a clean draft (one the
    # reference would accept) rejected at least once, so this test is not the reference's τ again
    assert any(drafter.proposal(i, 1) == [teacher[i]] and argmax[i] != teacher[i] for i in range(len(teacher)))
    assert len(teacher) / res.verify_steps < len(teacher) / len(hand_count(teacher, teacher, drafter))


@pytest.mark.parametrize("vc", [dict(name="reference"), dict(name="int4", group_size=32)])
def test_teacher_that_is_the_verifiers_own_output_changes_nothing(tiny, vc):
    """Held to its own greedy output, a verifier decodes exactly its free run: same tokens, same
    accepted count at every step (so the reference's τ_tf is its τ)."""
    ver = build_verifier(tiny, OmegaConf.create(vc), None)
    own = greedy_continuation(ver, PROMPT, 40)
    free = generate(ver, Oracle(own, len(PROMPT)), PROMPT, 40, K)
    held = generate(ver, Oracle(own, len(PROMPT)), PROMPT, 40, K, teacher=own)
    assert free.output_ids == held.output_ids == own
    assert free.step_accepted == held.step_accepted and free.accepted > 0


def test_teacher_forcing_needs_greedy_decoding(tiny):
    with pytest.raises(QuasarError, match="temperature=0"):
        generate(tiny.runtime, Oracle([1, 2], len(PROMPT)), PROMPT, 8, K, temperature=1.0,
                 generator=torch.Generator().manual_seed(0), teacher=[1, 2])
    with pytest.raises(QuasarError, match="empty teacher"):
        generate(tiny.runtime, Oracle([], len(PROMPT)), PROMPT, 8, K, teacher=[])


def test_experiment_rows_carry_tau_tf(tmp_path):
    """In a run, a drafting cell of a non-reference verifier gets τ_tf (in its repeat-0 rows) from the reference's
    continuation (checked against a direct teacher-forced decode of the first turn); the
    reference verifier's and AR's rows leave it empty; teacher_forced=false measures none."""
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    from quasar_bench.drafters import make_drafter
    from quasar_bench.encode import encode_turn
    from quasar_bench.run import Experiment

    conf = Path(__file__).resolve().parent.parent / "conf"
    base = ["model=tiny_llama", "dataset.limit=2", "max_new_tokens=12", "progress=false", "warmup=false",
            "matrix.verifiers=[reference,{name:int4,group_size:32}]", "matrix.drafters=[ar,ngram]", "matrix.extra=[]",
            "experiment_name=t"]
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("config", overrides=base + [f"out_dir={tmp_path / 'a'}"])
        off = compose("config", overrides=base + [f"out_dir={tmp_path / 'b'}", "teacher_forced=false"])
    exp = Experiment(cfg)
    exp.run()
    rows = exp.store.load()
    tf = rows[(rows.verifier == "int4") & (rows.drafter == "ngram")]
    assert tf.loc[tf.repeat > 0, "tau_tf"].isna().all()  # untimed and deterministic: repeat 0 only
    tf = tf[tf.repeat == 0]
    assert len(tf) >= 2 and tf.tau_tf.notna().all()
    assert rows[(rows.verifier == "reference") | (rows.drafter == "ar")].tau_tf.isna().all()
    ver = build_verifier(exp.loaded, OmegaConf.create({"name": "int4", "group_size": 32}), None)
    for p in exp.prompts:
        ids = encode_turn(exp.loaded, p.turns[:1], [])
        teacher = greedy_continuation(exp.loaded.runtime, ids, 12, exp.loaded.eos_ids)
        res = generate(ver, make_drafter({"name": "ngram", "k": 5}, ver), ids, 12, 5, exp.loaded.eos_ids,
                       teacher=teacher)
        row = tf[(tf.prompt_id == str(p.prompt_id)) & (tf.turn == 1)].iloc[0]
        assert (row.tf_new_tokens, row.tf_verify_steps) == (len(teacher), res.verify_steps)
        assert math.isclose(row.tau_tf, len(teacher) / res.verify_steps)
    exp_off = Experiment(off)
    exp_off.run()
    assert "tau_tf" not in exp_off.store.load() or exp_off.store.load().tau_tf.isna().all()


def test_teacher_forcing_in_a_batch_equals_one_at_a_time(tiny):
    """Sequences of one batch, each held to its own teacher (of different lengths), keep the
    drafts and steps they keep alone."""
    from quasar_bench.batching import BatchRuntime
    from quasar_bench.decode import generate_batch

    ver = build_verifier(tiny, OmegaConf.create({"name": "int4", "group_size": 32}), None)
    prompts = [PROMPT, [1, 2, 3, 4, 1, 2]]
    teachers = [greedy_continuation(tiny.runtime, p, n) for p, n in zip(prompts, (30, 17))]
    alone = [generate(ver, Oracle(t, len(p)), p, 30, K, teacher=t) for p, t in zip(prompts, teachers)]
    together = generate_batch(BatchRuntime(ver, 2), [Oracle(t, len(p)) for p, t in zip(prompts, teachers)], prompts,
                              30, K, teachers=teachers)
    for a, b, t in zip(alone, together, teachers):
        assert a.output_ids == b.output_ids == t and a.step_accepted == b.step_accepted
