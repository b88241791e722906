"""`bench profile` times real engine steps of the asked composition and writes a profile the planner reads."""

import json
from collections import Counter

import pytest

from tokenmill.bench.profile import default_prefills
from tokenmill.cli import main
from tokenmill.cost.step_times import load_profile
from tokenmill.engine.scheduler import Scheduler


def test_profile_times_engine_steps_of_exactly_each_cell_composition(smollm2_path, tmp_path, monkeypatch, one_thread):
    steps = Counter()
    real_schedule = Scheduler.schedule

    def recording(self):
        out = real_schedule(self)
        steps[sum(n for _, n in out.scheduled if n > 1), out.num_decodes] += 1
        return out

    monkeypatch.setattr(Scheduler, "schedule", recording)
    out = tmp_path / "profile.json"
    assert main(["bench", "profile", "--model", str(smollm2_path), "--prefill-tokens", "0", "12", "24",
                 "--decode-seqs", "0", "3", "--context", "20", "--sweep-contexts", "20", "60", "--sweep-seqs", "2",
                 "--repeats", "2", "--num-threads", str(one_thread), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    cells = {(c["prefill_tokens"], c["decode_seqs"]): c for c in report["grid"]}
    assert set(cells) == {(12, 0), (24, 0), (0, 3), (12, 3), (24, 3)}
    for (prefill, decodes), cell in cells.items():
        assert steps[prefill, decodes] >= 2  # each timed step ran the cell's composition
        assert len(cell["runs_ms"]) == 2 and cell["ms"] > 0
    assert cells[0, 3]["decode_context"] >= 20
    sweep = [c["decode_context"] for c in report["context_sweep"]]
    assert sweep == [pytest.approx(20, abs=5), pytest.approx(60, abs=5)]
    assert report["machine"]["cpu"] and report["machine"]["threads"] >= 1
    assert report["settings"]["max_num_seqs"] == 64  # the settings to plan with, not the profiling engine's
    profile = load_profile(out)
    # A step like a profiled cell, its decodes holding the keys the cell's held, takes the cell's time.
    held = 3 * cells[24, 3]["decode_context"]
    assert profile.times.seconds(24, 3, decode_context=held) == pytest.approx(cells[24, 3]["ms"] / 1000)


def test_the_default_prompt_sizes_give_the_planner_two_above_0_under_any_budget():
    assert default_prefills(512) == [0, 16, 64, 128, 256, 512]
    assert default_prefills(16) == [0, 8, 16]  # was [0, 16], which the planner refuses
    assert default_prefills(4) == [0, 2, 4]


@pytest.mark.parametrize("sizes, message", [(["0", "1", "16"], "--prefill-tokens must be 0 or at least 2"),
                                            (["0", "256"], "--prefill-tokens needs two sizes above 0")])
def test_a_prefill_grid_the_planner_cannot_use_is_refused_in_one_line(capsys, sizes, message):
    assert main(["bench", "profile", "--prefill-tokens", *sizes]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
