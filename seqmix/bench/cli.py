"""``seqmix bench`` and ``seqmix report``."""

from __future__ import annotations

from pathlib import Path

import click

from seqmix.bench.config import Plan, expand, list_suites, load_suite, parse_mixers, parse_overrides

DEFAULT_DB = Path("runs/bench.db")
DEFAULT_REPORT = Path("runs/report")


def plan_table(plan: Plan, done: set[str]) -> str:
    """One line per planned run: task, pattern, mixer, size, parameters, learning rate, seed, budget."""
    from seqmix.bench import store
    from seqmix.bench.report import si_format
    from seqmix.bench.runner import build
    from seqmix.models import count_parameters
    from seqmix.tasks import task_options

    header = ["#", "task", "options (not default)", "pattern", "mixer", "d_model×layers", "params", "lr", "seed", "budget", "device", "status"]
    rows, params = [], {}
    for i, planned in enumerate(plan.runs, 1):
        c = planned.config
        size_key = (c.task, str(sorted(c.task_options.items())), c.mixer_label, c.d_model, c.n_layers, c.n_heads)
        if size_key not in params:
            params[size_key] = count_parameters(build(c)[1])
        defaults = task_options(c.task)
        options = ",".join(f"{k}={v}" for k, v in sorted(c.task_options.items()) if v != defaults[k])
        budget = f"{c.epochs}ep×{c.train_size}" + (f" ≤{c.max_steps} steps" if c.max_steps else "")
        rows.append([str(i), c.task, options, planned.pattern.short, c.mixer_label, f"{c.d_model}×{c.n_layers}", si_format(params[size_key]),
                     f"{c.lr:g}", str(c.seed), budget, c.device, "done" if store.run_id(c) in done else "planned"])  # fmt: skip
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in [header, *rows])


@click.command("bench")
@click.option("--suite", default="quick", show_default=True, help=f"A suite ({', '.join(list_suites())}) or a path to a suite .toml file.")
@click.option("--mixers", default=None, help="Comma-separated mixers in place of the suite's; 'a+b' is one mixer per layer.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None, help="Default: the suite's (auto: cuda if available).")
@click.option("--db", type=click.Path(dir_okay=False, path_type=Path), default=DEFAULT_DB, show_default=True, help="The results store.")
@click.option("--dry-run", is_flag=True, help="Print every planned run and exit.")
@click.option(
    "--sequence-parallel", type=click.IntRange(min=1), default=None, metavar="P",
    help="Split each sequence over P ranks (P > 1: launch with torchrun --nproc_per_node P; decoder_lm tasks).",
)  # fmt: skip
@click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")
def bench(
    suite: str, mixers: str | None, device: str | None, db: Path, dry_run: bool, sequence_parallel: int | None, overrides: tuple[str, ...]
) -> None:
    """Train and evaluate the runs of a suite; finished runs in --db are skipped (resume).

    KEY=VALUE overrides a run field for every run (e.g. lr=3e-3 max_steps=50 target=none), or a
    task option with TASK.OPTION=VALUE (e.g. mqar.seq_len=128).
    """
    from seqmix.bench import parallel, runner, store

    try:
        parsed = parse_overrides(overrides)
        if device is not None:
            parsed["device"] = device
        if sequence_parallel is not None:
            parsed["sequence_parallel"] = sequence_parallel
        plan = expand(load_suite(suite), mixers=None if mixers is None else parse_mixers(mixers), overrides=parsed)
        ranks = {p.config.sequence_parallel for p in plan.runs}
        if len(ranks) > 1:
            raise ValueError(f"one launch serves one sequence_parallel value, the plan has {sorted(ranks)}")
        P = ranks.pop()
        if P > 1 and not dry_run:
            parallel.check_launch(P)
    except (ValueError, TypeError) as e:
        raise click.UsageError(str(e)) from None
    if dry_run:
        done = set()
        if db.is_file():
            conn = store.connect(db)
            done = {r["id"] for r in store.load_runs(conn, "done")}
            conn.close()
        click.echo(f"suite {plan.suite}: {len(plan.runs)} runs ({sum(store.run_id(p.config) in done for p in plan.runs)} already done in {db})")
        click.echo(plan_table(plan, done))
        for line in plan.skipped:
            click.echo(f"not run: {line}")
        return
    if P > 1:
        parallel.init_group(plan.runs[0].config.device)
    main_rank = parallel.rank() == 0  # only rank 0 writes to the store and prints
    if main_rank:
        for line in plan.skipped:
            click.echo(f"not run: {line}")
    conn = store.connect(db) if main_rank else None
    try:
        summary = runner.run_plan(plan, conn)
    finally:
        if conn is not None:
            conn.close()
        if P > 1:
            parallel.leave_group()
    if not main_rank:
        return
    click.echo(f"suite {plan.suite}: {len(summary.done)} done, {len(summary.skipped)} already done (skipped), {len(summary.failed)} failed; store: {db}")
    if summary.failed:
        raise SystemExit(1)


@click.command("report")
@click.option("--db", type=click.Path(dir_okay=False, path_type=Path), default=DEFAULT_DB, show_default=True, help="The results store.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_REPORT, show_default=True, help="Output folder.")
def report(db: Path, out: Path) -> None:
    """Write report.md (leaderboards, compositional index, mixer summary), PNG plots and runs.csv."""
    from seqmix.bench.report import write_report

    try:
        path = write_report(db, out)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"wrote {path}")
