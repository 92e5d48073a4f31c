"""A comparison's output directory: compare writes only what it owns, and removes nothing else.

``--out`` may be a directory that already holds other work (``--out .`` in a project with a
``runs/lora`` training run). Compare owns:

- ``compare-runs/`` — training directories, worker logs, specs and searches — when it created
  it (it then holds the marker file :data:`MARKER`); a ``compare-runs/`` without the marker
  is not compare's and is an error;
- the files listed under ``"files"`` in ``plan.json`` (result JSONs, the report and its
  figures), recorded as it writes them. An existing file compare would write that is not
  listed is an error, before any run starts. A ``plan.json`` that is not a comparison's is an
  error too. A ``plan.json`` written before the list existed owns the files of its runs and
  the report's, which is all an earlier compare wrote at the top level.

Inside ``compare-runs/`` compare may remove a run's leftover directory (a killed run) before
redoing it; it never removes anything outside it.
"""

from __future__ import annotations

import json
from pathlib import Path

from peftlab.core.config import ConfigError
from peftlab.core.fileio import atomic_write_json

RUNS = "compare-runs"
MARKER = ".peftlab-compare"
REPORT_FILES = (
    "report.md",
    "report.html",
    "summary.json",
    *(f"figures/{n}.png" for n in ("loss_curves", "memory", "speed", "params_vs_quality")),
)


class OutDir:
    """The output directory ``root`` and what compare owns in it."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        self.runs = self.root / RUNS
        self.plan_path = self.root / "plan.json"
        self.plan: dict = {"runs": [], "files": []}

    def open(self) -> OutDir:
        """Read ``plan.json`` and check ``compare-runs/``; ConfigError for either if it is not
        compare's. Nothing is written yet."""
        if self.root.exists() and not self.root.is_dir():
            raise ConfigError(f"--out {self.root} is a file, not a directory; give a directory")
        blocker = next((p for p in self.root.parents if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            raise ConfigError(
                f"--out {self.root}: Not a directory: its parent {blocker} is a file; "
                f"give a directory"
            )
        if self.plan_path.exists():
            try:
                plan = json.loads(self.plan_path.read_text())
            except (OSError, ValueError):
                plan = None
            if not isinstance(plan, dict) or not isinstance(plan.get("runs"), list):
                raise ConfigError(
                    f"{self.plan_path} exists and is not a peftlab compare plan; compare will "
                    f"not overwrite it: pass another --out"
                )
            if "files" not in plan:  # written before ownership was recorded
                plan["files"] = [f"{r['name']}.json" for r in plan["runs"] if "name" in r]
                plan["files"] += list(REPORT_FILES)
            self.plan = plan
        if self.runs.exists() and not (self.runs / MARKER).is_file():
            raise ConfigError(
                f"{self.runs} exists and was not created by peftlab compare; compare will not "
                f"write into it: pass another --out"
            )
        return self

    def check_covers(self, names: list[str], report: bool) -> None:
        """ConfigError when the comparison recorded here has runs that ``names`` (this one's)
        leave out and this one would rewrite the report: the report would then cover only
        a part of the recorded comparison. Extending it with more methods or seeds is fine."""
        recorded = [r["name"] for r in self.plan["runs"] if isinstance(r, dict) and "name" in r]
        left_out = [n for n in recorded if n not in set(names)]
        if report and left_out:
            raise ConfigError(
                f"{self.root} holds a comparison with runs this one leaves out "
                f"({', '.join(left_out[:6])}{', …' if len(left_out) > 6 else ''}); its report "
                f"would be replaced by one without them: give the same methods and seeds "
                f"(finished runs are skipped), or another --out"
            )

    def prepare(self) -> None:
        """Create ``compare-runs/`` with its marker (once every check has passed)."""
        self.runs.mkdir(parents=True, exist_ok=True)
        marker = self.runs / MARKER
        if not marker.is_file():
            marker.write_text("created by peftlab compare; it may remove what is here\n")

    def name(self, path: str | Path) -> str:
        return Path(path).resolve().relative_to(self.root).as_posix()

    def owns(self, path: str | Path) -> bool:
        p = Path(path).resolve()
        return p.is_relative_to(self.runs) or self.name(p) in self.plan["files"]

    def check(self, paths) -> None:
        """ConfigError naming the first of ``paths`` that exists and is not compare's."""
        for path in paths:
            if Path(path).exists() and not self.owns(path):
                raise ConfigError(
                    f"{path} exists and was not written by peftlab compare; compare will not "
                    f"overwrite it: move it or pass another --out"
                )

    def claim(self, paths) -> None:
        """Record ``paths`` as compare's (before writing them) and save the plan."""
        names = [self.name(p) for p in paths]
        self.plan["files"] = list(dict.fromkeys([*self.plan["files"], *names]))
        self.save()

    def set_runs(self, runs: list[dict]) -> None:
        """Record ``runs`` (replacing those of the same name); recorded runs this comparison
        does not include stay recorded (a report-less rerun of one method keeps the rest)."""
        names = {r["name"] for r in runs}
        kept = [r for r in self.plan["runs"] if isinstance(r, dict) and r.get("name") not in names]
        self.plan["runs"] = [*runs, *kept]
        self.save()

    def save(self) -> None:
        atomic_write_json(self.plan_path, self.plan)


def check_resumable(specs) -> None:
    """Refuse to mix results of different settings in one directory: ConfigError for the
    first of ``specs`` (RunSpecs) whose recorded result was made with other settings."""
    from peftlab.results import RunResult

    for spec in specs:
        done = RunResult.load(spec.result_path)
        if done is not None and done.run_info.fingerprint != spec.fingerprint:
            raise ConfigError(
                f"{spec.result_path} holds a run made with different settings than this comparison "
                f"(model, data, steps, batch, lr or method options differ); pass another --out, or "
                f"delete that file to rerun it"
            )
