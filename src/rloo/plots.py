"""The report's plots: which metrics get one, the series math (moving average, bin-mean downsampling)
and one small PNG per plot.

Matplotlib is used through its object API (``Figure`` on an Agg canvas), never pyplot, so drawing a
report changes no global state of the user's plotting session and needs no display. It is imported
on the first drawing, so ``rloo.report`` imports cheaply.
"""

from __future__ import annotations

import io
import itertools
import math
from dataclasses import dataclass

import numpy as np

PLOTS = {  # file stem -> (metric key or key prefix "x/", title, y label); drawn in this order when logged
    "reward": ("reward", "reward (total)", "reward"),
    "reward_sources": ("rewards/", "reward per source", "reward"),
    "kl": ("kl", "KL to the reference policy (per completion)", "nats"),
    "completion_length": ("completion_length", "completion length", "tokens"),
    "entropy": ("entropy", "policy entropy", "nats / token"),
    "clip_ratio": ("clip_ratio", "clipped fraction", "fraction"),
    "grad_norm": ("grad_norm", "gradient norm (before clipping)", "norm"),
    "learning_rate": ("learning_rate", "learning rate", "learning rate"),
    "episodes_per_s": ("episodes_per_s", "throughput", "completions / s"),
    "timings": ("time/", "seconds per step, by phase (stacked)", "seconds"),
    "memory": ("memory/", "peak memory, by phase", "MiB"),
    "eval_reward": ("eval/reward", "held-out evaluation", "reward"),
    "eval_completion_length": ("eval/completion_length", "held-out completion length", "tokens"),
}
UNSMOOTHED = ("learning_rate",)  # a schedule: a moving average would only lag it
LOG_SCALE = ("grad_norm",)  # when spiky (max / min > 30): spikes would otherwise flatten the rest of the curve
MAX_POINTS = 1500  # per drawn line: a 100k-step run stays a small, fast page
FIGSIZE = (6.0, 3.0)
DPI = 90


@dataclass
class Series:
    """One metric over training: ``steps_N`` ascending, ``values_N`` finite floats."""

    steps_N: np.ndarray
    values_N: np.ndarray


@dataclass
class Binned:
    """A series cut down to at most MAX_POINTS: step and value means per bin, and each bin's min and max
    (the spread the means hide). The first and last points are kept as they are."""

    steps_M: np.ndarray
    means_M: np.ndarray
    lows_M: np.ndarray
    highs_M: np.ndarray


def series_by_key(rows: dict[int, dict]) -> dict[str, Series]:
    """Each numeric key's series over the rows (step -> metrics line); nulls, booleans, strings, NaN and
    inf are left out, so a step with nothing scorable leaves a gap rather than a crash.

    >>> found = series_by_key({1: {"step": 1, "kl": None, "reward": 0.5}, 2: {"step": 2, "kl": 0.1, "reward": "x"}})
    >>> {key: (s.steps_N.tolist(), s.values_N.tolist()) for key, s in found.items()}
    {'kl': ([2.0], [0.1]), 'reward': ([1.0], [0.5])}
    """
    steps_N = np.fromiter(rows, dtype=np.float64, count=len(rows))
    found = {}
    # Key by key over all rows (one list comprehension each): a 100k-step run reads in a fraction of a second.
    lines = list(rows.values())
    for key in set().union(*lines) - {"step"}:
        column = list(map(dict.get, lines, itertools.repeat(key)))  # map: C speed, 100k lines in milliseconds
        try:
            types = list(map(type, column))
            if types.count(bool) or types.count(str):
                raise TypeError  # a flag or a text (numpy would convert "0.5"): the careful path below
            values_N = np.array(column, dtype=np.float64)  # every value a number: numpy converts at C speed
        except (TypeError, ValueError):  # a null, a text, a flag: each value checked
            try:
                values_N = np.array([v if type(v) in (float, int) else math.nan for v in column], dtype=np.float64)
            except OverflowError:  # an integer beyond float64: not a metric to plot
                continue
        except OverflowError:
            continue
        # Beyond 1e200 (a diverged run) the axis arithmetic overflows: such a value is left out like a NaN.
        finite_N = np.abs(values_N) < 1e200
        if finite_N.any():
            found[key] = Series(steps_N[finite_N], values_N[finite_N])
    return dict(sorted(found.items()))


def smoothing_window(num_points: int) -> int:
    """Moving-average window for a series of ``num_points``: about sqrt(N), so a 20-step run gets 5 and a
    100k-step run 317 (1 = no smoothing).

    >>> [smoothing_window(n) for n in (1, 4, 20, 100_000)]
    [1, 1, 5, 317]
    """
    return 1 if num_points < 5 else math.ceil(math.sqrt(num_points))


def moving_average(values_N: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean of the last ``window`` values at each point (fewer at the start), same length.

    >>> moving_average(np.array([1.0, 2.0, 3.0, 4.0]), 2).tolist()
    [1.0, 1.5, 2.5, 3.5]
    """
    cumsum_N1 = np.concatenate(([0.0], np.cumsum(values_N, dtype=np.float64)))
    ends_N = np.arange(1, len(values_N) + 1)
    starts_N = np.maximum(ends_N - window, 0)
    means_N = (cumsum_N1[ends_N] - cumsum_N1[starts_N]) / (ends_N - starts_N)
    # Within the data's range: the cumsum's rounding would otherwise turn a constant into 1e-16 wiggles.
    return np.clip(means_N, values_N.min(), values_N.max()) if len(values_N) else means_N


def downsample(series: Series, max_points: int = MAX_POINTS) -> Binned:
    """Means of consecutive points in at most ``max_points`` bins, the first and last points kept as they are
    (so the final value reads true).

    >>> b = downsample(Series(np.arange(1.0, 11.0), np.arange(10.0)), 4)
    >>> b.steps_M.tolist(), b.means_M.tolist(), b.highs_M.tolist()
    ([1.0, 3.5, 7.5, 10.0], [0.0, 2.5, 6.5, 9.0], [0.0, 4.0, 8.0, 9.0])
    """
    steps, values = series.steps_N, series.values_N
    if len(values) <= max_points:
        return Binned(steps, values, values, values)
    inner_steps, inner_values = steps[1:-1], values[1:-1]
    starts = np.linspace(0, len(inner_values), max_points - 1).astype(np.int64)[:-1]  # max_points - 2 bins
    counts = np.diff(np.append(starts, len(inner_values)))

    def with_ends(inner: np.ndarray, first: float, last: float) -> np.ndarray:
        return np.concatenate(([first], inner, [last]))

    return Binned(with_ends(np.add.reduceat(inner_steps, starts) / counts, steps[0], steps[-1]),
                  with_ends(np.add.reduceat(inner_values, starts) / counts, values[0], values[-1]),
                  with_ends(np.minimum.reduceat(inner_values, starts), values[0], values[-1]),
                  with_ends(np.maximum.reduceat(inner_values, starts), values[0], values[-1]))


def new_axes(title: str, ylabel: str):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    FigureCanvasAgg(fig)
    # Fixed margins: a layout engine (tight / constrained) costs a second draw per figure.
    fig.subplots_adjust(left=0.12, right=0.97, top=0.9, bottom=0.15)
    ax = fig.add_subplot()
    # An explicit y: matplotlib then skips placing the title above the tick labels, a third of each draw.
    ax.set_title(title, fontsize=10, y=1.0, pad=4)
    ax.set_xlabel("step", fontsize=8, labelpad=1)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(labelsize=7)
    # Ticks are most of the drawing time: 5 per axis is enough for a 540-pixel plot.
    ax.xaxis.set_major_locator(MaxNLocator(5, integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(5))
    ax.yaxis.get_major_formatter().set_useOffset(False)  # "1e-14+1e-2" above a flat line says nothing
    ax.grid(True, alpha=0.3, linewidth=0.5)
    return fig, ax


def png_bytes(fig) -> bytes:
    buffer = io.BytesIO()
    # No "Software" tag: the bytes depend on the data only, not on the installed matplotlib.
    fig.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return buffer.getvalue()


def line_plot(title: str, ylabel: str, named: dict[str, Series], window: int, log_y: bool = False) -> bytes:
    """Series sharing an axis: each raw (faint, with a min-max band where binned) and its moving average."""
    fig, ax = new_axes(title, ylabel)
    for i, (label, series) in enumerate(named.items()):
        color, raw = f"C{i}", downsample(series)
        if len(raw.steps_M) < len(series.steps_N):
            ax.fill_between(raw.steps_M, raw.lows_M, raw.highs_M, color=color, alpha=0.12, linewidth=0)
        if window > 1:
            ax.plot(raw.steps_M, raw.means_M, color=color, alpha=0.4, linewidth=0.8)
            smooth = downsample(Series(series.steps_N, moving_average(series.values_N, window)))  # full series first
            ax.plot(smooth.steps_M, smooth.means_M, color=color, linewidth=1.6, label=label)
        else:  # a marker too: a one- or two-point line is otherwise hard to see
            ax.plot(raw.steps_M, raw.means_M, color=color, linewidth=1.4, marker="o" if len(raw.steps_M) < 50 else None,
                    markersize=3, label=label)
    low, high = min(s.values_N.min() for s in named.values()), max(s.values_N.max() for s in named.values())
    if log_y and low > 0 and high / low > 30:
        ax.set_yscale("log")
    if len(named) > 1:
        ax.legend(fontsize=7, loc="best", frameon=False)
    return png_bytes(fig)


def stacked_plot(title: str, steps_N: np.ndarray, phases: dict[str, np.ndarray], window: int) -> bytes:
    """Per-phase seconds stacked over a shared step axis: each phase's moving average, then bin means."""
    fig, ax = new_axes(title, "seconds")
    layers = [downsample(Series(steps_N, moving_average(v, window))) for v in phases.values()]
    ax.stackplot(layers[0].steps_M, *[layer.means_M for layer in layers], labels=list(phases),
                 colors=[f"C{i}" for i in range(len(layers))], alpha=0.8, linewidth=0)
    ax.legend(fontsize=7, loc="upper right", frameon=False, ncols=min(len(phases), 5))
    ax.set_ylim(bottom=0, top=ax.get_ylim()[1] * 1.25)  # room above the stack for the legend
    return png_bytes(fig)


def eval_plot(title: str, ylabel: str, mean: Series, sems_N: np.ndarray | None, sources: dict[str, Series]) -> bytes:
    """Held-out evaluation: the mean reward with +/- 1 standard error, each source dashed."""
    fig, ax = new_axes(title, ylabel)
    marker = "o" if len(mean.steps_N) < 50 else None  # evaluations are few, unless eval_steps is tiny
    shown = downsample(mean)
    ax.plot(shown.steps_M, shown.means_M, color="C0", linewidth=1.6, marker=marker, markersize=3, label="reward")
    if sems_N is not None:
        sems = downsample(Series(mean.steps_N, sems_N)).means_M
        ax.fill_between(shown.steps_M, shown.means_M - sems, shown.means_M + sems, color="C0", alpha=0.2,
                        linewidth=0, label="+/- 1 s.e.")
    for i, (label, series) in enumerate(sources.items(), start=1):
        shown = downsample(series)
        ax.plot(shown.steps_M, shown.means_M, color=f"C{i}", linewidth=1.0, linestyle="--",
                marker=marker and ".", label=label)
    ax.legend(fontsize=7, loc="best", frameon=False)
    return png_bytes(fig)


def caption(named: dict[str, Series], window: int) -> str:
    binned = any(len(s.values_N) > MAX_POINTS for s in named.values())
    raw = f"per step, as {MAX_POINTS} bin means (shaded: each bin's min to max)" if binned else "per step"
    if window <= 1:
        return f"Values {raw}."
    return (f"Faint: {raw}; solid: moving average of the last {window} logged steps"
            + (" (computed before binning)." if binned else "."))


def eval_sems(rows: dict[int, dict], steps_N: np.ndarray) -> np.ndarray | None:
    """Standard error of each evaluation's mean reward (std / sqrt(num_prompts)), or None if one is missing."""
    sems = []
    for step in steps_N:
        std, num = rows[int(step)].get("eval/reward_std"), rows[int(step)].get("eval/num_prompts")
        if type(std) not in (int, float) or not math.isfinite(std) or type(num) is not int or num < 1:
            return None
        sems.append(std / math.sqrt(num))
    return np.asarray(sems, dtype=np.float64)


def draw_plots(logged: dict[str, Series], held_out: dict[str, Series], evals: dict[int, dict]
               ) -> dict[str, tuple[bytes, str]]:
    """stem -> (PNG bytes, caption) for each plot in PLOTS whose metric the run logged: ``logged`` and
    ``held_out`` are the training and evaluation series (series_by_key), ``evals`` the evaluation lines."""
    drawn: dict[str, tuple[bytes, str]] = {}
    for stem, (key, title, ylabel) in PLOTS.items():
        if key.startswith("eval/") or key == "time/":
            continue
        named = ({k.removeprefix(key): s for k, s in logged.items() if k.startswith(key)} if key.endswith("/")
                 else {key: logged[key]} if key in logged else {})
        if named:
            longest = max(len(s.values_N) for s in named.values())
            window = 1 if key in UNSMOOTHED else smoothing_window(longest)
            drawn[stem] = (line_plot(title, ylabel, named, window, key in LOG_SCALE), caption(named, window))
    phases = [k for k in logged if k.startswith("time/")]
    if phases:
        # A phase missing from a step (none ran) counts 0 s there, so the layers share one step axis.
        steps_N = np.unique(np.concatenate([logged[k].steps_N for k in phases]))
        layers = {}
        for key in phases:
            seconds_N = np.zeros_like(steps_N)
            seconds_N[np.searchsorted(steps_N, logged[key].steps_N)] = logged[key].values_N
            layers[key.removeprefix("time/")] = seconds_N
        window = smoothing_window(len(steps_N))
        drawn["timings"] = (stacked_plot(PLOTS["timings"][1], steps_N, layers, window),
                            "Wall seconds of each phase per step, stacked"
                            + (f"; moving average of the last {window} steps." if window > 1 else "."))
    if "eval/reward" in held_out:
        mean = held_out["eval/reward"]
        sems = eval_sems(evals, mean.steps_N)
        sources = {k.removeprefix("eval/rewards/"): s for k, s in held_out.items() if k.startswith("eval/rewards/")}
        drawn["eval_reward"] = (eval_plot(*PLOTS["eval_reward"][1:], mean, sems, sources),
                                "Mean reward on the held-out prompts at each evaluation (step 0: before training)"
                                + ("; band: +/- 1 standard error over prompts." if sems is not None else "."))
    if "eval/completion_length" in held_out:
        lengths = {"completion length": held_out["eval/completion_length"]}
        drawn["eval_completion_length"] = (line_plot(*PLOTS["eval_completion_length"][1:], lengths, 1),
                                           "Mean completion length on the held-out prompts at each evaluation.")
    return drawn
