"""``rloo report``: one self-contained ``report.html`` for a run folder, plus its plots as PNG files.

Reads the run's metrics.jsonl (training and evaluation lines), completions.jsonl, eval.json and
config.yaml; writes ``report.html`` (no network and no script: every image is an inline data URI) and
``plots/<name>.png``, which the model card embeds. A line or file that cannot be read is skipped, not
an error: the report is written at the end of every training run, including runs a kill cut short.
"""

from __future__ import annotations

import base64
import html
import json
import os
from pathlib import Path

import orjson

from rloo.plots import PLOTS, Series, draw_plots, series_by_key, smoothing_window

PLOT_FILES = tuple(f"plots/{stem}.png" for stem in PLOTS)  # every PNG write_report may write, relative to dest
NUM_SAMPLE_ROWS = 4  # completions.jsonl rows shown from the first and from the last step
NUM_EVAL_SAMPLES = 8  # eval.json samples shown
MAX_TEXT_CHARS = 2000  # per prompt or completion in the page

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em auto; max-width: 1120px; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; margin-bottom: .2em; }
h2 { font-size: 1.15em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
.summary td { padding: 1px 12px 1px 0; } .muted { color: #777; }
.plots { display: flex; flex-wrap: wrap; gap: 10px; }
figure { margin: 0; width: 540px; } figure img { width: 540px; height: 270px; display: block; }
figcaption { font-size: 12px; color: #555; }
table.grid { border-collapse: collapse; width: 100%; table-layout: fixed; }
table.grid td, table.grid th { border: 1px solid #ddd; padding: 4px 6px; vertical-align: top; text-align: left; }
table.grid th { background: #f4f4f4; } table.narrow { width: auto; table-layout: auto; align-self: flex-start; }
pre { white-space: pre-wrap; word-break: break-word; margin: 0; font: 12px/1.35 ui-monospace, monospace; }
details summary { cursor: pointer; color: #555; font-size: 12px; }
"""


def read_metrics(path: Path) -> tuple[dict[int, dict], dict[int, dict]]:
    """Training lines and evaluation lines (those with ``eval/`` keys) of metrics.jsonl by step, ascending.
    A line that is not a JSON object with an integer step (one a kill cut short) is skipped; a step
    logged twice (after a resume) keeps its later line."""
    train: dict[int, dict] = {}
    evals: dict[int, dict] = {}
    if not path.is_file():
        return train, evals
    with path.open(encoding="utf-8", errors="replace") as lines:
        for line in lines:
            row = json_object(line)
            step = None if row is None else row.get("step")
            if type(step) is int and step >= 0:
                # The substring test first: any() over every training line's keys is a second on 100k lines.
                is_eval = '"eval/' in line and any(key.startswith("eval/") for key in row)
                (evals if is_eval else train)[step] = row
    ascending = lambda rows: rows if all(a < b for a, b in zip(rows, list(rows)[1:])) else dict(sorted(rows.items()))  # noqa: E731
    return ascending(train), ascending(evals)


def json_object(line: str | bytes) -> dict | None:
    try:
        row = orjson.loads(line)  # 3x json's speed: a 100k-step file is mostly parsing
    except orjson.JSONDecodeError:
        try:
            row = json.loads(line)  # what orjson refuses and json reads: NaN, integers beyond 64 bits
        except ValueError:
            return None
    return row if isinstance(row, dict) else None


def read_json(path: Path) -> dict:
    """A JSON object file, or {} when it is absent or unreadable (the page then says what is missing)."""
    try:
        return json_object(path.read_bytes()) or {}
    except OSError:
        return {}


def read_config(path: Path) -> dict | str | None:
    """config.yaml as a mapping; its raw text if it is some other YAML; None if absent or unreadable."""
    import yaml

    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return value if isinstance(value, dict) else text


def completion_rows(path: Path) -> tuple[list[dict], list[dict]]:
    """Up to NUM_SAMPLE_ROWS rows of the first and of the last step in completions.jsonl. The file can be
    large (every completion of a long run): the head is read line by line, the tail in growing chunks."""
    if not path.is_file():
        return [], []
    first: list[dict] = []
    with path.open("rb") as lines:
        for row in filter(None, map(json_object, lines)):
            if len(first) == NUM_SAMPLE_ROWS or first and row.get("step") != first[0].get("step"):
                break
            first.append(row)
    return first, last_step_rows(path)


def last_step_rows(path: Path, chunk: int = 1 << 18, max_chunk: int = 1 << 26) -> list[dict]:
    """The first rows of the file's last block of one step: read back from the end until the step changes."""
    size = path.stat().st_size
    with path.open("rb") as data:
        while True:
            start = max(size - chunk, 0)
            data.seek(start)
            lines = data.read(size - start).split(b"\n")[1 if start else 0:]  # the first may be cut by the seek
            rows = list(filter(None, map(json_object, lines)))
            block = rows[-1:]
            for row in reversed(rows[:-1]):
                if row.get("step") != block[-1].get("step"):
                    return block[::-1][:NUM_SAMPLE_ROWS]
                block.append(row)
            if start == 0 or chunk >= max_chunk:  # the block reaches the start of what we read: take it
                return block[::-1][:NUM_SAMPLE_ROWS]
            chunk *= 4


def write_atomic(path: Path, data: bytes) -> None:
    """A temporary file then a rename, so a reader (a browser, the hub upload) never sees half a file."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_bytes(data)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def fmt(value: object) -> str:
    return f"{value:.4g}" if type(value) is float else "n/a" if value is None else esc(value)


def clipped(text: str) -> str:
    if len(text) <= MAX_TEXT_CHARS:
        return text
    return text[:MAX_TEXT_CHARS] + f" … [{len(text) - MAX_TEXT_CHARS} more characters]"


def prompt_text(prompt: object) -> str:
    """A text prompt as is; chat messages as ``role: content`` lines."""
    if isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt):
        return "\n".join(f"{m.get('role', '?')}: {m.get('content', '')}" for m in prompt)
    return prompt if isinstance(prompt, str) else json.dumps(prompt, default=str)


def prompt_html(prompt: object, preview_chars: int = 90) -> str:
    """The prompt's start, the whole of it one click away (TL;DR posts run to thousands of characters)."""
    text = prompt_text(prompt)
    preview = " ".join(text[:preview_chars].split()) + ("…" if len(text) > preview_chars else "")
    return (f"<details><summary>{esc(preview)} <span class=muted>({len(text)} characters)</span></summary>"
            f"<pre>{esc(clipped(text))}</pre></details>")


def text_html(text: object) -> str:
    return f"<pre>{esc(clipped(text if isinstance(text, str) else json.dumps(text, default=str)))}</pre>"


def header_html(name: str, train: dict[int, dict], logged: dict[str, Series], held_out: dict[str, Series],
                summary: dict) -> str:
    rows = [("training steps", f"{len(train)} logged" + (f" (steps {min(train)} to {max(train)})" if train else ""))]
    reward = logged.get("reward")
    if reward is not None:
        steps, values = reward.steps_N, reward.values_N
        window = smoothing_window(len(values))
        text = f"{values[0]:.4g} at step {int(steps[0])} → {values[-1]:.4g} at step {int(steps[-1])}"
        if window > 1:
            text += f" (mean of the last {window} logged steps: {values[-window:].mean():.4g})"
        rows.append(("reward", text))
    if type(summary.get("reward_before")) is float and type(summary.get("reward_after")) is float:
        gain = (f", gain {summary['gain']:+.4g} ± {summary['gain_se']:.2g} s.e."
                if type(summary.get("gain")) is float and type(summary.get("gain_se")) is float else "")
        prompts = f" on {summary['num_prompts']} prompts" if type(summary.get("num_prompts")) is int else ""
        before, after = summary["reward_before"], summary["reward_after"]
        rows.append(("held-out reward", f"{before:.4g} before → {after:.4g} after training{prompts}{gain}"))
    elif "eval/reward" in held_out and len(held_out["eval/reward"].steps_N) > 1:
        scored = held_out["eval/reward"]
        first, last = (f"{scored.values_N[i]:.4g} at step {int(scored.steps_N[i])}" for i in (0, -1))
        rows.append(("held-out reward", f"{first} → {last}"))
    cells = "".join(f"<tr><td class=muted>{esc(k)}</td><td>{esc(v)}</td></tr>" for k, v in rows)
    return f"<h1>rloo run: {esc(name)}</h1>\n<table class=summary>{cells}</table>"


def plots_html(drawn: dict[str, tuple[bytes, str]]) -> str:
    if not drawn:
        return "<p>Nothing to plot: metrics.jsonl has no training or evaluation steps yet.</p>"
    sections = {"Training": [s for s in drawn if not s.startswith("eval_")],
                "Held-out evaluation": [s for s in drawn if s.startswith("eval_")]}
    parts = []
    for title, stems in sections.items():
        if stems:
            figures = "".join(
                f"<figure><img alt=\"{esc(PLOTS[s][1])}\" width=540 height=270 src=\"data:image/png;base64,"
                f"{base64.b64encode(drawn[s][0]).decode()}\"><figcaption>{esc(drawn[s][1])}</figcaption></figure>"
                for s in stems)
            parts.append(f"<h2>{title}</h2>\n<div class=plots>{figures}</div>")
    return "\n".join(parts)


def samples_html(summary: dict, first: list[dict], last: list[dict]) -> str:
    samples = [s for s in summary.get("samples") or [] if isinstance(s, dict)][:NUM_EVAL_SAMPLES]
    if samples:
        rows = "".join(
            f"<tr><td>{prompt_html(s.get('prompt', ''))}</td>"
            f"<td>{text_html(s.get('before', ''))}<span class=muted>reward {fmt(s.get('reward_before'))}</span></td>"
            f"<td>{text_html(s.get('after', ''))}<span class=muted>reward {fmt(s.get('reward_after'))}</span></td></tr>"
            for s in samples)
        return ("<h2>Samples: the same held-out prompts before and after training</h2>\n<table class=grid>"
                f"<tr><th>prompt</th><th>before training</th><th>after training</th></tr>{rows}</table>")
    if not first and not last:
        return ("<h2>Samples</h2>\n<p>No sample completions: eval.json has no samples and there is no "
                "completions.jsonl.</p>")

    def cell(row: dict | None) -> str:
        if row is None:
            return "<td></td>"
        facts = f"reward {fmt(row.get('reward'))}, length {fmt(row.get('length'))}"
        return (f"<td>{prompt_html(row.get('prompt', ''))}{text_html(row.get('completion', ''))}<span class=muted>"
                f"{facts}{', truncated' if row.get('truncated') is True else ''}</span></td>")

    rows = "".join(f"<tr>{cell(first[i] if i < len(first) else None)}{cell(last[i] if i < len(last) else None)}</tr>"
                   for i in range(max(len(first), len(last))))
    return ("<h2>Samples: training completions at the start and at the end</h2>\n<p class=muted>From completions.jsonl "
            "(eval.json has no samples): different prompts in the two columns.</p>\n<table class=grid><tr>"
            f"<th>start: step {fmt(first[0].get('step') if first else None)}</th>"
            f"<th>end: step {fmt(last[0].get('step') if last else None)}</th></tr>{rows}</table>")


def metrics_html(found: dict[str, Series]) -> str:
    """Every numeric training metric's first, last, min and max, plotted or not."""
    if not found:
        return ""

    def row(key: str, s: Series) -> str:
        values = (s.values_N[0], s.values_N[-1], s.values_N.min(), s.values_N.max())
        cells = "".join(f"<td>{float(v):.4g}</td>" for v in values)
        return f"<tr><td>{esc(key)}</td>{cells}<td>{len(s.values_N)}</td></tr>"

    rows = "".join(row(key, found[key]) for key in sorted(found))
    return ("<h2>All training metrics</h2>\n<details><summary>first, last, min and max of each</summary>"
            "<table class=\"grid narrow\"><tr><th>metric</th><th>first</th><th>last</th><th>min</th><th>max</th>"
            f"<th>steps logged</th></tr>{rows}</table></details>")


def config_value(value: object) -> str:
    """A value as YAML would read it; a local absolute path by its last part only (the page may be shared)."""
    if isinstance(value, str):
        return f"…/{Path(value).name}" if value.startswith(("/", "~")) or Path(value).is_absolute() else value
    return json.dumps(value, default=str)


def config_html(config: dict | str | None) -> str:
    if config is None:
        return "<h2>Config</h2>\n<p>No config.yaml in the run folder.</p>"
    if isinstance(config, str):
        return f"<h2>Config</h2>\n<pre>{esc(config)}</pre>"
    rows = [f"<tr><td>{esc(k)}</td><td><pre>{esc(config_value(v))}</pre></td></tr>" for k, v in config.items()]
    half = (len(rows) + 1) // 2  # two tables side by side: the ~80 fields in half the height
    tables = "".join(f"<table class=\"grid narrow\">{''.join(part)}</table>"
                     for part in (rows[:half], rows[half:]) if part)
    return ("<h2>Config (config.yaml, resolved)</h2>\n<p class=muted>Local paths are shown by their last part.</p>"
            f"<div class=plots>{tables}</div>")


def write_report(run_dir: Path, dest: Path | None = None) -> list[Path]:
    """Writes ``dest/report.html`` and ``dest/plots/<name>.png`` (``dest`` defaults to ``run_dir``) for the run
    in ``run_dir``; returns the PNG paths written. metrics.jsonl and completions.jsonl are read from
    ``run_dir``; config.yaml and eval.json from ``dest`` when there (the final files being staged), else ``run_dir``."""
    run_dir = Path(run_dir)
    dest = run_dir if dest is None else Path(dest)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: not a folder (expected a run folder with metrics.jsonl)")

    def staged(name: str) -> Path:
        return dest / name if (dest / name).is_file() else run_dir / name

    train, evals = read_metrics(run_dir / "metrics.jsonl")
    logged, held_out = series_by_key(train), series_by_key(evals)
    summary = read_json(staged("eval.json"))
    drawn = draw_plots(logged, held_out, evals)
    written = []
    if drawn:
        (dest / "plots").mkdir(parents=True, exist_ok=True)
    for stem, (png, _) in drawn.items():
        write_atomic(dest / "plots" / f"{stem}.png", png)
        written.append(dest / "plots" / f"{stem}.png")
    for name in PLOT_FILES:  # a plot from an earlier report the data no longer has (say, eval lines cut by a resume)
        if dest / name not in written:
            (dest / name).unlink(missing_ok=True)
    name = run_dir.resolve().name
    body = [header_html(name, train, logged, held_out, summary), plots_html(drawn),
            samples_html(summary, *completion_rows(run_dir / "completions.jsonl")), metrics_html(logged),
            config_html(read_config(staged("config.yaml")))]
    page = (f"<!doctype html>\n<html lang=en><head><meta charset=utf-8><title>rloo report: {esc(name)}</title>"
            # An empty icon: the browser asks for no favicon.ico, so an offline page logs no failed request.
            f"<link rel=icon href=\"data:,\"><style>{STYLE}</style></head>\n<body>\n" + "\n".join(body) +
            "\n<p class=muted>Written by <code>rloo report</code>.</p>\n</body></html>\n")
    write_atomic(dest / "report.html", page.encode("utf-8"))
    return written
