"""CPU tests of the kernel microbenchmarks' host-side arithmetic (their GPU parts run on the device)."""
import pytest

from quasar_kernels.microbench.wgmma_ablate import cta_times_summary


def test_cta_times_summary_merges_each_sms_intervals():
    # SM 0: two overlapping CTAs [0, 10] and [5, 20] -> resident 20 ns; SM 1: [2, 8] -> 6 ns;
    # SM 2: two disjoint CTAs [0, 3] and [10, 12] -> 5 ns; a fourth SM ran nothing.
    # span 20 ns, so busy = (20 + 6 + 5) / (4 x 20) by hand.
    rows = [(5, 20, 0), (0, 10, 0), (2, 8, 1), (10, 12, 2), (0, 3, 2)]
    s = cta_times_summary(rows, n_sms=4)
    assert s["span_us"] == pytest.approx(0.020)
    assert s["sm_busy"] == pytest.approx(31 / 80)
    assert s["last_start_us"] == pytest.approx(0.010)
    assert s["first_end_us"] == pytest.approx(0.003)
    assert s["median_end_us"] == pytest.approx(0.010)  # ends 3, 8, 10, 12, 20
    assert s["tick_ns"] == 1  # stamps 0, 2, 3, 5, 8, 10, 12, 20: the closest pair is 1 ns apart


def test_cta_times_summary_counts_an_sm_once_when_its_ctas_nest():
    # a CTA inside another's interval on the same SM adds nothing; offsets from the first start
    rows = [(1000, 2000, 7), (1200, 1500, 7)]
    s = cta_times_summary(rows, n_sms=1)
    assert s["sm_busy"] == pytest.approx(1.0)
    assert s["span_us"] == pytest.approx(1.0)


def test_ablate_refuses_two_modes_at_once(capsys):
    # --profile and --times each build one variant and run it differently: asking for both used to run
    # the profile silently and drop --times
    from quasar_kernels.microbench.wgmma_ablate import main

    with pytest.raises(SystemExit) as e:
        main(["--profile", "base", "--times", "base"])
    assert e.value.code == 2
    assert "not allowed with" in capsys.readouterr().err
