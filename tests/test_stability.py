"""Stability indicators on synthetic logs whose answers are known by construction."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mtrl import stability as st
from mtrl.cli import main
from mtrl.errors import MtrlError
from tests.fixtures.runs import QUIET, STEPS, N, write_run
from tests.fixtures.runs import metric_rows as rows


def eval_json(before_chrf: float, after_chrf: float, after_bleu: float = 20.0, after_det: float = 0.7) -> dict:
    def entry(chrf, bleu, det):
        return {"bleu": {"score": bleu, "signature": "nrefs:1|bleu"}, "chrf": {"score": chrf, "signature": "nrefs:1|chrf"},
                "ter": {"score": 60.0, "signature": "nrefs:1|ter"}, "detector_score": det, "examples": []}

    return {"before": entry(before_chrf, 18.0, 0.6), "after": entry(after_chrf, after_bleu, after_det), "wall_time_s": 3.0}


def report(run: Path) -> dict:
    rep = st.stability_report(run)
    json.dumps(rep, allow_nan=False)  # strictly JSON-serialisable, whatever the log held
    return rep


def test_rising_reward_is_monotone_and_raises_no_flag(tmp_path):
    rep = report(write_run(tmp_path / "run", rows(), eval_json(50.0, 51.0)))
    r = rep["reward"]
    assert r["slope_per_step"] == pytest.approx(0.01, abs=0.002)
    assert r["slope_per_100_steps"] == pytest.approx(100 * r["slope_per_step"])
    assert r["trend"] == "rising" and r["monotone"] and r["spearman"] > 0.8
    assert r["gain"] > 0.5
    assert rep["kl"]["final"] == pytest.approx(np.mean(0.02 * STEPS[-10:]))
    assert rep["kl"]["max"] == pytest.approx(2.0) and rep["kl"]["max_step"] == N
    assert rep["entropy"]["ratio"] == pytest.approx(np.mean(2 - 0.005 * STEPS[-10:]) / np.mean(2 - 0.005 * STEPS[:10]))
    assert rep["loss_spikes"] == {"policy_loss": 0, "value_loss": 0, "grad_norm": 0}
    assert rep["heldout_chrf"] == {"source": "eval_json", "start": 50.0, "end": 51.0, "change": 1.0}
    assert rep["eval"]["after"] == {"bleu": 20.0, "chrf": 51.0, "ter": 60.0, "detector_score": 0.7}
    assert not any(rep["flags"].values()), rep["flags"]


def test_exact_slope_and_rank_correlation_of_a_line(tmp_path):
    lines = rows(reward=3.0 * STEPS + 1)[::5]  # logged every 5 steps: the slope is still per step
    r = report(write_run(tmp_path / "run", lines))["reward"]
    assert r["slope_per_step"] == pytest.approx(3.0)
    assert r["slope_per_100_steps"] == pytest.approx(300.0)
    assert r["spearman"] == pytest.approx(1.0)
    assert r["drawdown"] == pytest.approx(0.0)


def test_collapsing_run_flags_entropy_and_falling_reward(tmp_path):
    entropy = 2.0 * np.exp(-STEPS / 15)  # ends ~2e-3 nats
    reward = -0.5 - 0.01 * STEPS + QUIET
    rep = report(write_run(tmp_path / "run", rows(reward=reward, entropy=entropy)))
    assert rep["entropy"]["collapse"] and rep["entropy"]["ratio"] < st.ENTROPY_COLLAPSE_FRAC
    assert rep["reward"]["trend"] == "falling" and rep["reward"]["slope_per_step"] < 0
    assert {k for k, v in rep["flags"].items() if v} == {"entropy_collapse", "reward_falling"}


def test_entropy_absolute_floor(tmp_path):
    entropy = np.full(N, st.ENTROPY_FLOOR / 2)  # never changed, but too low to explore
    rep = report(write_run(tmp_path / "run", rows(entropy=entropy)))
    assert rep["entropy"]["ratio"] == pytest.approx(1.0)
    assert rep["flags"]["entropy_collapse"]


@pytest.mark.parametrize("jump", [30.0, 12.0])  # over the absolute limit; 12x the floor within the window
def test_kl_blowup_is_flagged_at_the_jump(tmp_path, jump):
    kl = np.where(STEPS < 70, 0.5, jump)
    rep = report(write_run(tmp_path / "run", rows(kl=kl)))
    assert rep["kl"]["blowup_step"] == 70
    assert rep["kl"]["max"] == pytest.approx(jump) and rep["kl"]["final"] == pytest.approx(jump)
    assert {k for k, v in rep["flags"].items() if v} == {"kl_blowup"}


def test_steady_kl_growth_is_not_a_blowup(tmp_path):
    kl = 0.15 * STEPS  # 0.15 .. 15 nats: large but gradual
    rep = report(write_run(tmp_path / "run", rows(kl=kl)))
    assert rep["kl"]["blowup_step"] is None and not rep["flags"]["kl_blowup"]


def test_loss_spikes_are_counted(tmp_path):
    policy_loss, value_loss = 0.1 + QUIET, 0.5 + QUIET
    policy_loss[[10, 40, 80]] = [5.0, -5.0, 8.0]  # a negative spike counts by its magnitude
    value_loss[55] = 40.0
    rep = report(write_run(tmp_path / "run", rows(policy_loss=policy_loss, value_loss=value_loss)))
    assert rep["loss_spikes"] == {"policy_loss": 3, "value_loss": 1, "grad_norm": 0}
    assert {k for k, v in rep["flags"].items() if v} == {"loss_spikes"}


def test_count_spikes_uses_median_plus_k_mad():
    values = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 100.0])  # |x| median 3.5, MAD 1.5
    assert st.count_spikes(pd.Series(values), k=10, min_rows=1) == 1  # 100 > 18.5
    assert st.count_spikes(pd.Series(values), k=70, min_rows=1) == 0  # 100 < 108.5


def test_short_runs_get_no_trend_and_no_spike_counts(tmp_path):
    policy_loss = 0.1 + QUIET
    policy_loss[3] = 50.0
    lines = rows(policy_loss=policy_loss)[: st.MIN_TREND_ROWS - 1]  # rising reward, falling chrF, a spike
    rep = report(write_run(tmp_path / "run", lines, eval_json(50.0, 40.0)))
    assert rep["reward"]["trend"] == "unknown" and rep["reward"]["slope_per_step"] is None
    assert rep["reward"]["gain"] > 0  # still reported
    assert rep["loss_spikes"]["policy_loss"] == 0
    assert not any(rep["flags"].values()), rep["flags"]


def eval_lines(chrf: list[float]) -> list[dict]:
    steps = np.linspace(N // len(chrf), N, len(chrf)).astype(int)
    return [{"step": int(s), "eval_bleu": 20.0, "eval_chrf": c, "eval_detector_score": 0.7} for s, c in zip(steps, chrf, strict=True)]


def test_reward_hacking_from_eval_lines(tmp_path):
    run = write_run(tmp_path / "run", rows() + eval_lines([49.0, 47.0, 45.0]), eval_json(50.0, 45.0))
    rep = report(run)
    assert rep["reward"]["trend"] == "rising"
    assert rep["heldout_chrf"] == {"source": "eval_lines", "start": 50.0, "end": 45.0, "change": -5.0}
    assert {k for k, v in rep["flags"].items() if v} == {"reward_hacking"}


def test_eval_lines_take_precedence_over_eval_json(tmp_path):
    # eval.json alone would say chrF fell (after < before), the eval curve says it rose: the curve wins
    run = write_run(tmp_path / "run", rows() + eval_lines([51.0, 53.0]), eval_json(50.0, 40.0))
    rep = report(run)
    assert rep["heldout_chrf"]["source"] == "eval_lines" and rep["heldout_chrf"]["change"] == pytest.approx(3.0)
    assert not rep["flags"]["reward_hacking"]


def test_reward_hacking_from_eval_json_and_its_negatives(tmp_path):
    hacked = report(write_run(tmp_path / "a", rows(), eval_json(50.0, 48.0)))
    assert hacked["heldout_chrf"]["source"] == "eval_json" and hacked["flags"]["reward_hacking"]
    within_noise = report(write_run(tmp_path / "b", rows(), eval_json(50.0, 50.0 - st.HACKING_CHRF_DROP / 2)))
    assert not within_noise["flags"]["reward_hacking"]
    falling = report(write_run(tmp_path / "c", rows(reward=-0.01 * STEPS + QUIET), eval_json(50.0, 40.0)))
    assert not falling["flags"]["reward_hacking"]  # reward did not rise: a bad run, not a hacked one
    no_eval = report(write_run(tmp_path / "d", rows()))
    assert no_eval["heldout_chrf"]["source"] is None and not no_eval["flags"]["reward_hacking"]


def test_resumed_log_keeps_the_last_line_of_a_step(tmp_path):
    first = rows()[:50]
    redone = rows(reward=np.full(N, 7.0))[45:60]  # resumed from step 45: steps 46..60 logged again
    lines = first + eval_lines([52.0]) + redone  # an eval line at step 100 must not replace step 100's row
    run = write_run(tmp_path / "run", lines)
    df = st.load_metrics(run)
    assert df["step"].tolist() == list(range(1, 61))
    assert (df.loc[df["step"] >= 46, "reward_mean"] == 7.0).all()
    assert df.loc[df["step"] == 45, "reward_mean"].item() == pytest.approx(first[44]["reward_mean"])
    assert "eval_chrf" not in df
    assert st.load_eval_curve(run)["eval_chrf"].tolist() == [52.0]
    assert report(run)["duplicate_steps_dropped"] == 5
    assert st.load_metrics(run / "metrics.jsonl").equals(df)  # the file path works as well


def test_non_finite_values_are_flagged_and_stay_json_safe(tmp_path):
    policy_loss = 0.1 + QUIET
    policy_loss[30] = np.nan
    kl = 0.02 * STEPS
    kl[[20, 60]] = [np.nan, np.inf]  # NaN: non-finite but not a blow-up; inf: both
    rep = report(write_run(tmp_path / "run", rows(policy_loss=policy_loss, kl=kl)))
    assert rep["non_finite_rows"] == 3 and rep["flags"]["non_finite"]
    assert rep["kl"]["blowup_step"] == 61 and rep["kl"]["max"] == pytest.approx(2.0)


def test_compare_runs_spread_matches_numpy(tmp_path):
    finals, chrfs = [1.0, 2.0, 4.0], [50.0, 52.0, 57.0]
    seeds = [write_run(tmp_path / f"a{i}", rows(reward=np.full(N, f)), eval_json(50.0, c))
             for i, (f, c) in enumerate(zip(finals, chrfs, strict=True))]
    other = [write_run(tmp_path / "b0", rows(kl=np.where(STEPS < 70, 0.5, 30.0)), eval_json(50.0, 51.0))]
    table = st.compare_runs({"a": seeds, "b": other})
    assert list(table.index) == ["a", "b"]
    a = table.loc["a"]
    assert a["n_seeds"] == 3
    assert a["final_reward_mean"] == pytest.approx(np.mean(finals))
    assert a["final_reward_std"] == pytest.approx(np.std(finals, ddof=1))
    assert a["after_chrf_std"] == pytest.approx(np.std(chrfs, ddof=1))
    assert a["after_bleu_std"] == pytest.approx(0.0)
    assert a["frac_kl_blowup"] == 0.0 and table.loc["b", "frac_kl_blowup"] == 1.0
    assert np.isnan(table.loc["b", "final_reward_std"])  # one seed: no spread to report


def test_plots_write_png_files(tmp_path):
    runs = {"token": [write_run(tmp_path / "t0", rows()), write_run(tmp_path / "t1", rows()[:70])],
            "sentence": [write_run(tmp_path / "s0", rows(kl=np.where(STEPS < 70, 0.5, 30.0)))]}
    for plot, name in ((st.plot_reward_curves, "reward.png"), (st.plot_kl_entropy, "plots/kl.png")):
        out = plot(runs, tmp_path / name)
        data = out.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_seed_band_is_mean_and_std_over_seeds(tmp_path):
    a = write_run(tmp_path / "a", rows(reward=np.full(N, 1.0)))
    b = write_run(tmp_path / "b", rows(reward=np.full(N, 3.0))[:50])
    band = st.seed_band(st.metric_curves([a, b], "reward_mean", window=1))
    assert band.loc[10, "mean"] == pytest.approx(2.0) and band.loc[10, "std"] == pytest.approx(np.std([1, 3], ddof=1))
    assert band.loc[80, "mean"] == pytest.approx(1.0) and band.loc[80, "n"] == 1


@pytest.mark.parametrize("content, message", [
    ("", "no training steps"),
    ('{"step": 1, "eval_chrf": 50.0}\n', "no training steps"),
    ('{"step": 1, "reward_mean": 0.1}\n\n{"step": 2, "reward_mean": 0.2\n', "line 3 is not valid JSON"),
    ('{"step": 1, "reward_mean": 0.1}\n{"step": 2, "kl": 0.1}\n', "line 2 has no 'reward_mean'"),
    ('{"step": "1", "reward_mean": 0.1}\n', "line 1 has no integer 'step'"),
    ('{"step": 1, "reward_mean": 0.1, "kl": "big"}\n', "line 1: 'kl' is not a number"),
    ("[1, 2]\n", "line 1 is not a JSON object"),
    ('{"step": 1, "reward_mean": 0.1, "guard_length": "high"}\n', "line 1: 'guard_length' is not a number"),
    ('{"step": 1, "reward_mean": 0.1, "length_ratio_mean": [1.0]}\n', "line 1: 'length_ratio_mean' is not a number"),
])
def test_bad_metrics_files_name_file_and_line(tmp_path, content, message):
    (tmp_path / "metrics.jsonl").write_text(content)
    with pytest.raises(MtrlError, match=message) as err:
        st.stability_report(tmp_path)
    assert str(tmp_path / "metrics.jsonl") in str(err.value)


def test_missing_metrics_file(tmp_path):
    with pytest.raises(MtrlError, match="no such file"):
        st.load_metrics(tmp_path / "nowhere")


# --------------------------------------------------------------------------- guards, length, language
def with_columns(lines: list[dict], **columns) -> list[dict]:
    """``lines`` with extra per-step columns (arrays of length N, or one value for every step)."""
    out = []
    for i, line in enumerate(lines):
        out.append({**line, **{k: float(v if np.isscalar(v) else v[i]) for k, v in columns.items()}})
    return out


FLAT_REWARD = np.full(N, 0.5)
RAMP = (STEPS - 1) / (N - 1)  # 0 .. 1


def test_rising_guard_with_rising_reward_is_reward_hacking(tmp_path):
    rep = report(write_run(tmp_path / "run", with_columns(rows(), guard_length=0.5 * RAMP, guard_copy=0.01)))
    assert rep["reward"]["trend"] == "rising"
    g = rep["guards"]["length"]
    assert g["initial"] == pytest.approx(np.mean(0.5 * RAMP[:10])) and g["final"] == pytest.approx(np.mean(0.5 * RAMP[-10:]))
    assert g["change"] == pytest.approx(g["final"] - g["initial"])
    assert set(rep["guards"]) == {"length", "copy"}  # only the logged guards
    assert rep["hacking_reasons"] == ["guard_length_rose"]
    assert {k for k, v in rep["flags"].items() if v} == {"reward_hacking"}


def test_rising_guard_with_flat_reward_is_not_hacking(tmp_path):
    rep = report(write_run(tmp_path / "run", with_columns(rows(reward=FLAT_REWARD), guard_length=0.5 * RAMP)))
    assert rep["reward"]["trend"] == "flat"
    assert rep["guards"]["length"]["change"] > 0.4  # the guard did rise ...
    assert rep["hacking_reasons"] == [] and not rep["flags"]["reward_hacking"]  # ... but the reward did not


@pytest.mark.parametrize("start, end", [(0.3, 0.3), (0.3, 0.45), (0.0, 0.04)])  # constant; < 2x; < GUARD_RISE
def test_guard_rates_that_did_not_rise_enough_are_not_hacking(tmp_path, start, end):
    lines = with_columns(rows(), guard_language=start + (end - start) * RAMP, guard_loop=0.2)
    rep = report(write_run(tmp_path / "run", lines))
    assert rep["reward"]["trend"] == "rising"
    assert rep["guards"]["language"]["final"] < max(2 * rep["guards"]["language"]["initial"],
                                                    rep["guards"]["language"]["initial"] + st.GUARD_RISE)
    assert rep["hacking_reasons"] == [] and not rep["flags"]["reward_hacking"]


def test_hacking_reasons_combine_heldout_chrf_and_guards(tmp_path):
    lines = with_columns(rows(), guard_empty=0.3 * RAMP, guard_loop=0.02 + 0.2 * RAMP)
    rep = report(write_run(tmp_path / "run", lines, eval_json(50.0, 45.0)))
    assert rep["hacking_reasons"] == ["heldout_chrf_fell", "guard_empty_rose", "guard_loop_rose"]
    assert rep["flags"]["reward_hacking"]


def test_falling_length_ratio_is_length_drift(tmp_path):
    lines = with_columns(rows(), length_ratio_mean=1.2 - 0.4 * RAMP, target_language_share=1.0 - 0.1 * RAMP)
    rep = report(write_run(tmp_path / "run", lines))
    lr = rep["length_ratio"]
    assert lr["initial"] == pytest.approx(np.mean(1.2 - 0.4 * RAMP[:10]))
    assert lr["final"] == pytest.approx(np.mean(1.2 - 0.4 * RAMP[-10:]))
    assert lr["relative_change"] == pytest.approx((lr["final"] - lr["initial"]) / lr["initial"])
    assert lr["relative_change"] < -st.LENGTH_DRIFT
    assert rep["target_language"]["final"] == pytest.approx(np.mean(1.0 - 0.1 * RAMP[-10:]))
    assert rep["target_language"]["change"] < 0
    assert {k for k, v in rep["flags"].items() if v} == {"length_drift"}


def test_small_length_change_is_not_drift(tmp_path):
    rep = report(write_run(tmp_path / "run", with_columns(rows(), length_ratio_mean=1.0 - 0.1 * RAMP)))
    assert -st.LENGTH_DRIFT < rep["length_ratio"]["relative_change"] < -0.05
    assert not rep["flags"]["length_drift"]


def test_old_logs_without_the_new_columns(tmp_path):
    rep = report(write_run(tmp_path / "run", rows(), eval_json(50.0, 51.0)))
    assert rep["guards"] == {}
    assert rep["length_ratio"] == {"initial": None, "final": None, "change": None, "relative_change": None}
    assert rep["target_language"] == {"initial": None, "final": None, "change": None}
    assert rep["hacking_reasons"] == []
    assert rep["flags"]["length_drift"] is False and rep["flags"]["reward_hacking"] is False
    text = st.format_report(rep)
    assert "no flags set" in text and "guard trip rates" in text and "not logged" in text
    row = next(line for line in text.splitlines() if line.startswith("length ratio"))
    assert row.split()[-3:] == ["-", "-", "-"]


def test_compare_runs_reports_length_drift_and_new_finals(tmp_path):
    drift = write_run(tmp_path / "a0", with_columns(rows(), length_ratio_mean=1.2 - 0.4 * RAMP, target_language_share=0.9))
    steady = write_run(tmp_path / "a1", with_columns(rows(), length_ratio_mean=1.0, target_language_share=0.8))
    old = write_run(tmp_path / "b0", rows())
    table = st.compare_runs({"a": [drift, steady], "b": [old]})
    finals = [st.stability_report(d)["length_ratio"]["final"] for d in (drift, steady)]
    assert table.loc["a", "frac_length_drift"] == 0.5 and table.loc["b", "frac_length_drift"] == 0.0
    assert table.loc["a", "length_ratio_final_mean"] == pytest.approx(np.mean(finals))
    assert table.loc["a", "length_ratio_final_std"] == pytest.approx(np.std(finals, ddof=1))
    assert table.loc["a", "target_language_final_mean"] == pytest.approx(0.85)
    assert np.isnan(table.loc["b", "length_ratio_final_mean"]) and np.isnan(table.loc["b", "target_language_final_mean"])


# --------------------------------------------------------------------------- mtrl stability output
def hacked_run(path: Path) -> Path:
    lines = with_columns(rows(), guard_length=0.5 * RAMP, guard_language=0.01,
                         length_ratio_mean=1.2 - 0.4 * RAMP, target_language_share=0.97)
    return write_run(path, lines, eval_json(50.0, 51.0))


def test_text_output_shows_flags_first_then_a_short_table(tmp_path, capsys):
    run = hacked_run(tmp_path / "run")
    assert main(["stability", str(run)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert 10 <= len(lines) < 30
    assert str(run) in lines[0]
    g0, g1 = np.mean(0.5 * RAMP[:10]), np.mean(0.5 * RAMP[-10:])  # 0.02 -> 0.48
    assert lines[1].strip().startswith(f"reward_hacking: guard 'length' trip rate rose {g0:.2f} -> {g1:.2f}")
    assert lines[1].rstrip().endswith("while reward rose")
    assert lines[2].strip().startswith("length_drift: length ratio") and "1.18 -> 0.82 (-31%" in lines[2]
    header = next(i for i, line in enumerate(lines) if line.split() == ["initial", "final", "change"])
    assert header == 3  # the table comes right after the flags
    table = {line.split("  ")[0].strip(): line for line in lines[header + 1:]}
    for label in ("reward", "KL (nats)", "entropy (nats/token)", "held-out chrF", "eval BLEU", "eval chrF",
                  "eval detector", "length ratio (hyp/src)", "target-language share", "guard length trip rate",
                  "guard language trip rate"):
        assert label in table, (label, out)
    assert table["eval chrF"].split()[2:5] == ["50.00", "51.00", "+1.00"]
    assert table["guard length trip rate"].split()[4:] == [f"{g0:.3f}", f"{g1:.3f}", f"{g1 - g0:+.3f}", "rose"]
    assert "{" not in out  # not JSON


def test_text_output_of_a_quiet_run_and_of_several_runs(tmp_path, capsys):
    a, b = write_run(tmp_path / "a", rows()), write_run(tmp_path / "b", rows(kl=np.where(STEPS < 70, 0.5, 30.0)))
    assert main(["stability", str(a), str(b)]) == 0
    blocks = capsys.readouterr().out.split("\n\n")
    assert len(blocks) == 2 and str(a) in blocks[0] and str(b) in blocks[1]
    assert blocks[0].splitlines()[1].strip() == "no flags set"
    assert blocks[1].splitlines()[1].strip().startswith("kl_blowup: KL blew up at step 70")
    held = next(line for line in blocks[0].splitlines() if line.startswith("held-out chrF"))
    assert held.split()[2:] == ["-", "-", "-"]
    assert "eval BLEU" not in blocks[0]  # no eval.json: no eval rows


def test_json_format_keeps_the_full_report_with_the_new_keys(tmp_path, capsys):
    run = hacked_run(tmp_path / "run")
    assert main(["stability", str(run), "--format", "json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["run"] == str(run)
    assert {k: v for k, v in got.items() if k != "run"} == json.loads(json.dumps(st.stability_report(run)))
    assert got["hacking_reasons"] == ["guard_length_rose"]
    assert got["flags"]["reward_hacking"] and got["flags"]["length_drift"]
    assert set(got["guards"]) == {"length", "language"}
    assert got["length_ratio"]["relative_change"] < -st.LENGTH_DRIFT
    assert got["target_language"]["final"] == pytest.approx(0.97)


def test_text_format_with_plots(tmp_path, capsys):
    run = hacked_run(tmp_path / "run")
    assert main(["stability", str(run), "--format", "text", "--plot", str(tmp_path / "plots")]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[1].strip().startswith("reward_hacking:")
    for name in ("reward_curves.png", "kl_entropy.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:4] == b"\x89PNG" and name in err
