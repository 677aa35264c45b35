"""The mutation gate (`make mutation`, `make mutation MODULES="stages/core/io.py stages/models/flow.py"`):
mutmut plants one small bug at a time in the modules that decide correctness and runs the fast
tests of that module only (:data:`MODULES`); a mutant the tests do not notice is a survivor. Writes
``reports/bench/mutation.md`` (mutants, killed, survivors with their diff, runtime, command).

Why mutmut (2.5.1) and not cosmic-ray: it mutates in place with one ``--runner`` command per
module (our module -> tests map is just a different runner per call), stops a mutant's tests at
10 × the clean run (mutmut's own limit; ``-m``/``-b`` set when a slow kill counts as suspicious), keeps results in a local cache between calls (a module is
re-tested only for the mutants that changed), and its smaller operator set (operators, numbers,
comparisons, keywords, strings, arguments) gives fewer equivalent mutants, which matters on a
shared 2-core machine; cosmic-ray needs a session file, a config and a worker setup per module and
produces several times the mutants. (mutmut 3 runs the whole tests dir with its own test selection
in a copied tree, not our per-module map.)

Not part of `make test` (it runs every mutant's tests: minutes to an hour per module); run it
after changing one of these modules or their tests (``MODULES=`` the changed ones), and in full
before a release. Mutants on log-message lines are skipped (``mutmut_config.py``): the wording
of a log line is not behaviour. Do not call ``mutmut show`` while a run is going: it re-reads the
module, which holds a mutant at that moment, into mutmut's cache (the report's diffs don't).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "reports/bench/mutation.md"
RUNS = ROOT / "reports/bench/mutation.json"  # per module: runtime, command, counts of the last run
CACHE = ROOT / ".mutmut-cache"

# module -> its fast tests (pytest node ids / -k selections); the order is the order `make mutation` runs
MODULES: dict[str, list[str]] = {
    "stages/models/flow.py": ["tests/test_train_units.py", "tests/test_objective.py"],
    "stages/models/checkpoint.py": ["tests/test_checkpoint_identity.py", "tests/test_checkpoint_files.py",
                                    "tests/test_atomic_writes.py",
                                    "tests/test_resume.py::test_code_hash_follows_the_train_stage_code_deps",
                                    "tests/test_resume.py::test_a_full_disk_while_checkpointing_names_the_folder"],
    "stages/core/io.py": ["tests/test_atomic_writes.py"] + [f"tests/test_core.py::test_{t}" for t in (
        "atomic_file_leaves_nothing_on_failure", "atomic_dir_replaces_whole_folder", "atomic_outputs_get_the_umask_mode",
        "a_rerun_clears_temp_folders_of_killed_writers_only", "full_disk_is_named",
        "shards_round_trip_and_are_deterministic")],
    "stages/metrics/vocab.py": ["tests/test_vocab.py"],
    "stages/core/lineage.py": ["tests/test_lineage.py"] + [f"tests/test_tracking.py::test_{t}" for t in (
        "repo_root_is_the_main_repo_even_in_a_dvc_temp_copy", "repo_root_is_git_top_level_from_a_subfolder",
        "flatten_scrub_and_dataset_hash")],
    "stages/core/params.py": ["tests/test_params_bounds.py", "tests/test_params_checks.py -k 'not batch_larger'",
                              "tests/test_params_sync.py",
                              "tests/test_core.py::test_schema_defaults_match_conf_defaults",
                              "tests/test_core.py::test_bad_params_are_named"],
    "stages/models/trainer.py": ["tests/test_objective.py", "tests/test_trainer_step.py"],
    "stages/models/export.py": ["tests/test_lora.py"],
    "stages/models/lora.py": ["tests/test_lora.py", "tests/test_objective.py"],
    # fast in-process tests first: most mutants fail there (pytest -x)
    "stages/curation/hashing.py": ["tests/test_hashing.py", "tests/test_dedupe.py"],
    # the stage-level tests only (the search and hash tests of test_dedupe.py exercise hashing.py)
    "stages/dedupe.py": [f"tests/test_dedupe.py::test_{t}" for t in (
        "searches_decide_by_their_own_view_and_hash", "hash_rows_counts_every_row_and_records_missing_sizes_as_zero",
        "decide_without_candidates_or_without_readable_images", "decide_verification_switch_boundary_and_missing_signatures",
        "decide_keeps_the_most_pixels_whatever_the_shape", "largest_clusters_sheet_shows_the_largest_clusters_keeper_first",
        "running_the_module_runs_the_stage",
        "threshold_boundaries_of_the_search_and_the_second_vote", "stage_end_to_end",
        "flips_and_offset_crops_are_found_and_series_stay_apart",
        "keep_rule_prefers_the_source_over_its_reencodes_and_says_why")],
    "stages/metrics/traits.py": ["tests/test_traits_values.py", "tests/test_metrics_traits.py"],
    # folder.scan in process (test_folder_scan.py scans the hostile tree, whose own tests run the stage
    # in a subprocess, ~7 s), then the folder source through the stage (test_download.py)
    "stages/data/folder.py": ["tests/test_folder_scan.py"] + [f"tests/test_download_hostile.py::test_{t}" for t in (
        "an_inside_sidecar_row_through_a_folder_link_finds_its_image",
        "first_caption_extension_wins_and_the_other_is_not_an_orphan")] + [f"tests/test_download.py::test_{t}" for t in (
        "repeats_of_nearest_kohya_folder", "folder_rows_metadata_and_rejects", "folder_report_accounts_for_every_file",
        "folder_limit_is_a_seeded_sample", "missing_folder_fails_with_a_message", "caption_files_and_repeat_folders_are_read",
        "bad_caption_files_are_recorded_rejects", "folder_conventions_are_configurable",
        "a_folder_without_usable_images_leaves_data_raw_as_it_was")],
}
# mutmut stops a mutant's tests at 10 × the clean run (a timeout); a kill slower than
# MULTIPLIER × the clean run + BASE s is marked "suspicious" (still a kill)
MULTIPLIER, BASE = 3.0, 20.0
# params.py is mostly field descriptions: without its string mutants (docs and message texts; the
# messages are pinned by tests/test_params_checks.py) it has ~270 mutants instead of ~670
OPTIONS = {"stages/core/params.py": ["--disable-mutation-types", "string,fstring"]}


def runner(tests: list[str]) -> str:
    """The command mutmut runs per mutant: this module's ``--pytest`` mode (below)."""
    args = [a for t in tests for a in shlex.split(t)]
    return " ".join([shlex.quote(sys.executable), "-m", "tests.mutation", "--pytest", *map(shlex.quote, args)])


def run_pytest(args: list[str]) -> int:
    """pytest on ``args``, exit 1 on any failure: mutmut 2 counts only exit code 1 as "tests
    failed", so a mutant that breaks the import (pytest's exit 2, a collection error) would pass
    as a survivor."""
    import pytest  # in this process: mutmut's timeout kills this process, and so the tests

    code = pytest.main(["-x", "-q", "-p", "no:cacheprovider", "-o", "addopts=", *args])
    return 0 if code == 0 else 1


def command(module: str) -> list[str]:
    return [str(Path(sys.executable).with_name("mutmut")), "run", "--paths-to-mutate", module,
            "--runner", runner(MODULES[module]), "--tests-dir", "tests", "-m", str(MULTIPLIER), "-b", str(BASE),
            "--simple-output", "--no-progress", *OPTIONS.get(module, [])]


def run_module(module: str) -> dict:
    cmd = command(module)
    print(f"== {module}: {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": "0"})
    dt = time.time() - t0
    if subprocess.run(["git", "diff", "--quiet", "--", module], cwd=ROOT).returncode:
        raise SystemExit(f"{module} differs from git after mutmut: restore it (git checkout -- {module})")
    return {"seconds": round(dt), "exit": proc.returncode, "command": "make mutation MODULES=" + module,
            "runner": runner(MODULES[module]), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


# ----------------------------------------------------------------------------- the report
def statuses() -> dict[str, dict[str, list[int]]]:
    """file -> status -> mutant ids, from mutmut's cache (.mutmut-cache, sqlite)."""
    out: dict[str, dict[str, list[int]]] = {}
    if not CACHE.exists():
        return out
    con = sqlite3.connect(CACHE)
    q = ("SELECT SourceFile.filename, Mutant.status, Mutant.id FROM Mutant JOIN Line ON Mutant.line = Line.id "
         "JOIN SourceFile ON Line.sourcefile = SourceFile.id")
    for filename, status, mid in con.execute(q):
        out.setdefault(filename, {}).setdefault(status, []).append(mid)
    return out


def diff(mid: int) -> str:
    """A mutant's diff against the committed module, computed here (``mutmut show`` would re-read
    the file, which may hold a mutant while a run is going, into the cache; the cache is only read)."""
    import difflib

    from mutmut import Context, RelativeMutationID, mutate

    con = sqlite3.connect(f"file:{CACHE}?mode=ro", uri=True)
    filename, line, number, index = con.execute(
        'SELECT SourceFile.filename, Line.line, Line.line_number, Mutant."index" FROM Mutant JOIN Line ON '
        "Mutant.line = Line.id JOIN SourceFile ON Line.sourcefile = SourceFile.id WHERE Mutant.id = ?", (mid,)).fetchone()
    source = subprocess.run(["git", "show", f"HEAD:{filename}"], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout
    mutated, _ = mutate(Context(source=source, filename=filename, dict_synonyms=[],
                                mutation_id=RelativeMutationID(line=line, index=index, line_number=number)))
    return "\n".join(d for d in difflib.unified_diff(source.split("\n"), mutated.split("\n"), lineterm="", n=0)
                     if not d.startswith(("---", "+++")))


def why_equivalent(equivalent: dict, module: str, mid: int) -> str | None:
    """The reason a survivor is equivalent, looked up by its mutated line (ids change with the cache)."""
    lines = diff(mid).splitlines()
    added = [line[1:].strip() for line in lines if line.startswith("+") and line[1:].strip()]
    known = equivalent.get(module, {})
    if not added:  # a mutant that only removes lines: each one keyed "-<line>"
        removed = ["-" + line[1:].strip() for line in lines if line.startswith("-") and line[1:].strip()]
        return known[removed[0]] if removed and all(r in known for r in removed) else None
    return next((known[a] for a in added if a in known), None)


def write_report(equivalent: dict) -> None:
    runs = json.loads(RUNS.read_text()) if RUNS.exists() else {}
    st = statuses()
    lines = ["# Mutation gate (mutmut 2.5.1)", "",
             "`make mutation` (all modules) or `make mutation MODULES=\"stages/core/io.py ...\"`; each module's "
             "mutants run against that module's fast tests only (`tests/mutation.py`: MODULES). A mutant's "
             "tests are stopped at 10 × the clean run (mutmut's limit; counted as killed: the change was noticed). Survivors are listed with their diff; each is either killed by a new test or "
             "explained as equivalent below (`tests/mutation_equivalent.json`). Generated by `python -m tests.mutation --report`.", "",
             "| module | mutants | killed | timeout | survived | equivalent | not tested | skipped (log lines) | "
             "killed % | runtime | tests |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    total = killed_all = 0
    for module, tests in MODULES.items():
        s = st.get(module, {})
        if module not in runs or not s:
            lines.append(f"| `{module}` | not run yet | | | | | | | | | {', '.join(tests)} |")
            continue
        # ok_suspicious: killed, but the failing run took longer than the timeout's base
        killed, timeout = len(s.get("ok_killed", []) + s.get("ok_suspicious", [])), len(s.get("bad_timeout", []))
        survived = s.get("bad_survived", [])
        eq = [m for m in survived if why_equivalent(equivalent, module, m)]
        skipped, untested = len(s.get("skipped", [])), len(s.get("untested", []))
        n = killed + timeout + len(survived)
        score = (killed + timeout + len(eq)) / n if n else 1.0
        total += n
        killed_all += killed + timeout + len(eq)
        lines.append(f"| `{module}` | {n} | {killed} | {timeout} | {len(survived) - len(eq)} | {len(eq)} | "
                     f"{untested} | {skipped} | {score:.0%} | {runs[module]['seconds']} s | {', '.join(tests)} |")
    if total:
        lines += ["", f"**Run modules: {killed_all} of {total} mutants killed or equivalent "
                      f"({killed_all / total:.1%}).**"]
    lines += ["", "## Survivors", ""]
    for module in MODULES:
        s = st.get(module, {})
        for mid in s.get("bad_survived", []):
            why = why_equivalent(equivalent, module, mid)
            lines += [f"### `{module}` mutant {mid}" + (" — equivalent" if why else " — NOT killed"), "",
                      "```diff", diff(mid), "```", ""]
            if why:
                lines += [f"Equivalent: {why}", ""]
    lines += ["## Runs", "", "mutants = tested ones (killed + timeout + survived); killed % counts the equivalent "
              "ones as killed; not tested = mutants the last run did not reach.", "",
              "| module | last run | command | exit | note |", "|---|---|---|---:|---|"]
    for module, r in runs.items():
        lines.append(f"| `{module}` | {r['date']} | `{r['command']}` | {r['exit']} | {r.get('note', '')} |")
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text("\n".join(lines) + "\n")
    print(f"wrote {REPORT.relative_to(ROOT)}")


# mutants that cannot be killed because the program behaves the same: {module: {mutated line: why}}
# (a mutant that only removes a line is keyed "-<removed line>")
EQUIVALENT_FILE = ROOT / "tests/mutation_equivalent.json"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modules", nargs="*", default=None, help="default: all of MODULES, in order")
    ap.add_argument("--report", action="store_true", help="only rewrite the report from the cache")
    ap.add_argument("--pytest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)  # mutmut's runner
    args = ap.parse_args(argv)
    if args.pytest is not None:
        sys.exit(run_pytest(args.pytest))
    equivalent = json.loads(EQUIVALENT_FILE.read_text()) if EQUIVALENT_FILE.exists() else {}
    if not args.report:
        unknown = [m for m in args.modules or [] if m not in MODULES]
        if unknown:
            raise SystemExit(f"not in tests/mutation.py MODULES: {unknown}")
        runs = json.loads(RUNS.read_text()) if RUNS.exists() else {}
        for module in args.modules or list(MODULES):
            before = runs.get(module, {}).get("seconds", 0) if CACHE.exists() else 0
            runs[module] = run_module(module)  # a rerun tests only new and surviving mutants:
            runs[module]["seconds"] += before  # the runtime is the sum of the runs on this cache
            RUNS.write_text(json.dumps(runs, indent=2) + "\n")
    write_report(equivalent)


if __name__ == "__main__":
    main()
