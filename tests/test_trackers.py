"""Trackers, completions and periodic evaluation, against the real libraries, offline: TensorBoard's event
files read back with TensorBoard's own reader, a wandb offline run's .wandb file, a local Trackio project,
completions.jsonl and the console table, eval/ lines every eval_steps steps. Checks that a tracker that
cannot log stops the run in one line before any model loads."""

from __future__ import annotations

import io
import json
import math
import sys
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from rloo import train
from rloo.cli import main
from test_train_e2e import tiny_config

MAX_STEPS, EVAL_STEPS = 4, 2
SECRET = "hf_not_a_real_token_0123456789"


def metric_lines(run: Path) -> tuple[list[dict], list[dict]]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [m for m in lines if "eval/reward" not in m], [m for m in lines if "eval/reward" in m]


def expected_scalars(lines: list[dict]) -> dict[str, dict[int, float]]:
    """{tracker key: {step: value}} of every number in the metrics.jsonl lines (None left out)."""
    out: dict[str, dict[int, float]] = {}
    for line in lines:
        for key, value in line.items():
            if key != "step" and isinstance(value, (int, float)) and value is not None:
                name = key if key.startswith("eval/") else f"train/{key}"
                out.setdefault(name, {})[line["step"]] = float(value)
    return out


def wandb_records(path: Path):
    """The protobuf records of a .wandb file: LevelDB's log format (32 KiB blocks of 7-byte-headed
    chunks) after wandb's 7-byte ':W&B' header; wandb 0.31 ships no reader of its own."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # full, last
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending + chunk if kind == 4 else chunk)
            pending = b""
            yield record
        elif kind in (2, 3):  # first, middle
            pending += chunk


@pytest.fixture(scope="module")
def tracked_run(tiny_model_dir, tmp_path_factory):
    """One 4-step run logging to all three trackers, completions printed, evaluation every 2 steps."""
    mp = pytest.MonkeyPatch()
    home = tmp_path_factory.mktemp("tracker-home")
    for name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        mp.setenv(name, str(home / name.lower()))
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_SILENT", "true")
    mp.setenv("COLUMNS", "200")  # rich's width when stdout is not a terminal (80 folds the headers)
    mp.setattr(sys, "argv", ["rloo", "train", "--hub_token", SECRET])  # wandb records the command line
    out = tmp_path_factory.mktemp("tracked") / "run"
    cfg = tiny_config(tiny_model_dir, out, max_steps=MAX_STEPS, report_to=["tensorboard", "wandb", "trackio"],
                      run_name=f"tracked-{out.parent.name}", project="rloo-tests", log_completions=True,
                      num_completions_to_print=3, eval_strategy="steps", eval_steps=EVAL_STEPS, hub_token=SECRET)
    buffer = io.StringIO()
    with redirect_stdout(buffer):  # the console table (rich prints to sys.stdout)
        result = train(cfg)
    mp.undo()
    return result, buffer.getvalue()


def test_tensorboard_event_files_hold_every_metric_at_every_step(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result, _ = tracked_run
    steps, evals = metric_lines(result.output_dir)
    files = list((result.output_dir / "runs").glob("events.out.tfevents.*"))
    assert len(files) == 1
    events = EventAccumulator(str(files[0]), size_guidance={"scalars": 0, "tensors": 0}).Reload()
    expected = expected_scalars(steps + evals)
    assert set(expected) <= set(events.Tags()["scalars"])
    for key, by_step in expected.items():
        logged = {event.step: event.value for event in events.Scalars(key)}
        assert logged.keys() == by_step.keys(), key
        assert all(math.isclose(logged[s], v, rel_tol=1e-6, abs_tol=1e-6) for s, v in by_step.items()), key
    texts = [event.step for event in events.Tensors("completions/text_summary")]
    assert texts == list(range(1, MAX_STEPS + 1))


def test_wandb_offline_run_files_hold_every_metric_at_every_step(tracked_run):
    result, _ = tracked_run
    files = list((result.output_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    history: dict[int, dict] = {}
    for record in wandb_records(files[0]):
        if record.WhichOneof("record_type") == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history.setdefault(int(row["_step"]), {}).update(row)
    steps, evals = metric_lines(result.output_dir)
    for key, by_step in expected_scalars(steps + evals).items():
        for step, value in by_step.items():
            assert math.isclose(history[step][key], value, rel_tol=1e-9, abs_tol=1e-12), (key, step)
    tables = list(files[0].parent.glob("files/media/table/completions_*.table.json"))
    assert len(tables) == MAX_STEPS
    table = json.loads(tables[0].read_text())
    assert table["columns"][:3] == ["step", "prompt", "completion"] and len(table["data"]) == 4  # 2 prompts x k = 2
    saved = json.loads((result.output_dir / "trackers.json").read_text())
    assert saved["wandb"]["id"] == files[0].stem.removeprefix("run-")  # a resume continues this run


def test_trackio_local_project_holds_every_metric_at_every_step(tracked_run):
    from trackio.sqlite_storage import SQLiteStorage

    result, _ = tracked_run
    logs = SQLiteStorage.get_logs("rloo-tests", result.config.run_name)
    by_step: dict[int, dict] = {}
    for row in logs:
        by_step.setdefault(int(row["step"]), {}).update(row)
    steps, evals = metric_lines(result.output_dir)
    for key, values in expected_scalars(steps + evals).items():
        for step, value in values.items():
            assert math.isclose(by_step[step][key], value, rel_tol=1e-9, abs_tol=1e-12), (key, step)
    tables = [step for step, row in by_step.items() if row.get("completions", {}).get("_type") == "trackio.table"]
    assert sorted(tables) == list(range(1, MAX_STEPS + 1))


def test_completions_jsonl_console_table_and_periodic_evaluation(tracked_run):
    result, printed = tracked_run
    out = result.output_dir
    rows = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [s for s in range(1, MAX_STEPS + 1) for _ in range(4)]  # 2 prompts x k = 2
    for row in rows:
        assert set(row) == {"step", "prompt", "completion", "rewards", "reward", "advantage", "length", "truncated"}
        assert set(row["rewards"]) == {"grounding", "summary_length"} and isinstance(row["truncated"], bool)
        assert 1 <= row["length"] <= 8 and isinstance(row["prompt"], str) and row["prompt"].endswith("TL;DR:")
        weighted = row["rewards"]["grounding"] + 0.5 * row["rewards"]["summary_length"]
        assert math.isclose(row["reward"], weighted, rel_tol=1e-5, abs_tol=1e-6)
    for step in range(1, MAX_STEPS + 1):  # advantages: leave-one-out within each pair of siblings (beta 0.05)
        group = [r["advantage"] for r in rows if r["step"] == step]
        assert all(math.isclose(a + b, 0.0, abs_tol=1e-5) for a, b in zip(group[::2], group[1::2]))
    # the console table: TRL's columns, num_completions_to_print rows of each logged step
    assert printed.count("completions") >= MAX_STEPS and "3 of 4 completions" in printed
    for header in ("prompt", "completion", "grounding", "advantage"):
        assert header in printed
    first_words = rows[0]["completion"].split()
    assert not first_words or first_words[0] in printed
    steps, evals = metric_lines(out)
    assert [m["step"] for m in steps] == list(range(1, MAX_STEPS + 1))
    assert [m["step"] for m in evals] == [0, 2, 4]  # before, every eval_steps, after (the card's "after")
    assert evals[-1]["eval/reward"] == pytest.approx(result.eval_after["reward_mean"])
    assert evals[0]["eval/reward"] == pytest.approx(result.eval_before["reward_mean"])
    assert all(m["eval/num_prompts"] == 4 for m in evals)


def test_periodic_evaluation_changes_no_training_figure(tiny_model_dir, tmp_path, tracked_run):
    """Evaluating between steps draws from its own random stream: the training is the same without it."""
    result, _ = tracked_run
    plain = train(tiny_config(tiny_model_dir, tmp_path / "plain", max_steps=MAX_STEPS))
    clock = ("step_seconds", "episodes_per_s")
    strip = lambda m: {k: v for k, v in m.items() if k not in clock and not k.startswith(("time/", "memory/"))}  # noqa: E731
    assert [strip(m) for m in metric_lines(plain.output_dir)[0]] == [strip(m) for m in metric_lines(result.output_dir)[0]]


@pytest.mark.parametrize("tracker", ["wandb", "tensorboard", "trackio"])
def test_a_tracker_that_is_not_installed_fails_in_one_line_before_the_model_loads(tmp_path, monkeypatch, capsys,
                                                                                  tracker):
    monkeypatch.setitem(sys.modules, tracker, None)  # importlib.util.find_spec now says: not installed
    out = tmp_path / "run"
    code = main(["train", "--model_name_or_path", str(tmp_path / "no-such-model"), "--dataset_name", "rloo:tldr",
                 "--reward_funcs", "grounding", "--report_to", "tensorboard", tracker, "--output_dir", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1, err
    assert f"report_to {tracker}: the {tracker} package is not installed" in err and "no-such-model" not in err
    assert not out.exists()


def test_online_wandb_without_a_key_and_push_to_hub_offline_fail_in_one_line_before_training(tmp_path, monkeypatch,
                                                                                            capsys):
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DISABLED"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "netrc").write_text("")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    base = ["train", "--model_name_or_path", str(tmp_path / "no-such-model"), "--dataset_name", "rloo:tldr",
            "--reward_funcs", "grounding", "--output_dir", str(tmp_path / "run")]
    assert main([*base, "--report_to", "wandb"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "report_to wandb: no W&B API key" in err and "WANDB_MODE=offline" in err
    assert main([*base, "--push_to_hub", "--hub_model_id", "someone/rloo-tiny"]) == 1  # HF_HUB_OFFLINE=1 here
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("rloo train: error: push_to_hub: the Hugging Face Hub is off"), err
    assert not (tmp_path / "run").exists()


def test_no_file_of_the_run_or_its_trackers_holds_the_hub_token(tracked_run):
    from trackio.utils import TRACKIO_DIR

    result, printed = tracked_run
    files = [p for p in result.output_dir.rglob("*") if p.is_file()] + list(Path(TRACKIO_DIR).rglob("*.db"))
    run_file = next(p for p in files if p.suffix == ".wandb")
    assert b"--hub_token" in run_file.read_bytes()  # wandb did record the command line: with the value hidden
    leaks = [str(p) for p in files if SECRET.encode() in p.read_bytes()]
    assert leaks == [] and SECRET not in printed


def test_eval_strategy_steps_without_held_out_prompts_is_one_line(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="^eval_strategy steps: the run has no held-out prompts"):
        train(tiny_config(tiny_model_dir, tmp_path / "run", num_eval_samples=0, eval_strategy="steps"))
    assert not (tmp_path / "run").exists()


def test_resuming_a_finished_run_redoes_its_final_evaluation_once(tiny_model_dir, tmp_path):
    """Its last checkpoint is at max_steps, the final evaluation after it: done again, its line not doubled."""
    out = tmp_path / "run"
    train(tiny_config(tiny_model_dir, out, max_steps=2, save_steps=2))
    first = (out / "metrics.jsonl").read_text()
    train(tiny_config(tiny_model_dir, out, max_steps=2, save_steps=2, resume_from_checkpoint="latest"))
    assert (out / "metrics.jsonl").read_text() == first
    assert [m["step"] for m in metric_lines(out)[1]] == [0, 2]
