"""mutmut's hook (the mutation gate: tests/mutation.py, `make mutation`): mutants on log-message
lines are skipped, since the wording of a log line is not behaviour (errors raised are mutated)."""


def pre_mutation(context):
    line = context.current_source_line.strip()
    if line.startswith(("log.", "logger.", "logging.")) or ".log(" in line:
        context.skip = True
