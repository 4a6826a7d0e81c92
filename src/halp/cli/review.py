"""`halp review`: label answers by hand in the browser (or export them for Label Studio); rendering of review stats."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated
from urllib.parse import urlencode

import typer

from halp.cli.app import AnsweredRunArgument, app, console, err_console, fail

if TYPE_CHECKING:
    from halp.review.decisions import ReviewSummary

EXPORT_FORMATS = ("label-studio",)


@app.command()
def review(
    run_dir: AnsweredRunArgument,
    out: Annotated[Path | None, typer.Argument(help="With --export: the file to write.")] = None,
    images: Annotated[
        Path | None, typer.Option(help="Directory the run's image ids are relative to (halp extract's --images).")
    ] = None,
    host: Annotated[str, typer.Option(help="Address to listen on (the page needs the printed token on any).")] = (
        "127.0.0.1"
    ),
    no_token: Annotated[
        bool, typer.Option("--no-token", help="Loopback only: serve without a token (any local user can then decide).")
    ] = False,
    port: Annotated[int, typer.Option(help="Port (0: any free one).")] = 8765,
    reviewer: Annotated[
        str | None, typer.Option(help="Your name in reviews.jsonl (default: login name; the URL's ?reviewer= wins).")
    ] = None,
    queue: Annotated[
        str | None,
        typer.Option(
            help="Rows to start: unknown, all, rules (audit), disagree or doubtful. Default: unknown, or doubtful "
            "when every row has a label."
        ),
    ] = None,
    only: Annotated[str | None, typer.Option(help="Narrow the queue to column=value (category=animals).")] = None,
    order: Annotated[str, typer.Option(help="table, or risk (highest probe risk first).")] = "table",
    export: Annotated[str | None, typer.Option(help="Write tasks for another tool instead: label-studio.")] = None,
    image_url_prefix: Annotated[
        str, typer.Option(help="With --export label-studio: prefix of each image id in the task URLs.")
    ] = "/data/local-files/?d=",
) -> None:
    """Review answers in the browser: h hallucinated, c correct, u unsure; decisions go to RUN_DIR/reviews.jsonl."""
    from halp.layout import reviews_file

    if export is not None:
        _export(run_dir, export, out, image_url_prefix)
        return
    if out is not None:
        fail(f"unexpected argument {out}: a file is only taken with --export")
    if images is None:
        fail("pass --images DIR: the directory the run's image ids are relative to (as given to halp extract)")
    from halp.review.app import is_loopback, serve
    from halp.review.decisions import default_reviewer
    from halp.review.session import ReviewSession

    session = ReviewSession(run_dir, images, reviewer or default_reviewer())
    queue = queue or session.starting_queue()
    chosen = session.queue(queue, only, order)  # checks the choices before the server starts
    start = {"queue": queue, "order": order, **({"where": only} if only else {})}

    def ready(url: str) -> None:
        typer.echo(url + ("&" if "?" in url else "?") + urlencode(start))
        err_console.print(
            f"halp review: {len(session.rows)} rows, {len(chosen)} in queue {queue}"
            f"{' (' + only + ')' if only else ''}; reviewer {session.reviewer}; decisions go to "
            f"{reviews_file(run_dir)}. Ctrl-C stops.",
            markup=False,
            highlight=False,
        )
        if no_token:
            warning = (
                "warning: --no-token: any user or process on this machine can open the page, read the run's rows "
                "and images, and record decisions under any reviewer name."
            )
        elif is_loopback(host):
            warning = "the page needs the token in this URL: other users of this machine cannot open it without."
        else:
            warning = f"listening on {host}: the page needs the token in this URL; share it only with reviewers."
        err_console.print(warning, markup=False, highlight=False, soft_wrap=True)

    serve(session, host, port, on_ready=ready, token=not no_token)


def _export(run_dir: Path, fmt: str, out: Path | None, image_url_prefix: str) -> None:
    from halp.review.label_studio import write_tasks
    from halp.review.session import attach_risk, read_rows

    if fmt not in EXPORT_FORMATS:
        fail(f"--export {fmt!r}: choose one of {', '.join(EXPORT_FORMATS)}")
    if out is None:
        fail("--export needs the file to write: halp review RUN --export label-studio tasks.json")
    rows = read_rows(run_dir)
    attach_risk(run_dir, rows)
    tasks, config = write_tasks(rows, out, image_url_prefix)
    with_rule = sum(row.rule.label is not None for row in rows)
    console.print(
        f"wrote {len(rows)} Label Studio tasks to {tasks} ({with_rule} with the rule label as a prediction) and the "
        f"labeling config to {config}",
        markup=False,
        highlight=False,
    )


def print_review_summary(summary: ReviewSummary) -> None:
    """What the manual decisions did in `halp label`: conflicts, agreement with the rules, Cohen's kappa."""
    from rich.table import Table

    def say(text: str) -> None:
        console.print(text, markup=False, highlight=False)

    who = ", ".join(f"{name} {n}" for name, n in summary.reviewers.items()) or "none"
    say(
        f"manual review ({' + '.join(summary.sources)}): {summary.reviewed} rows reviewed (by {who}); "
        f"{summary.labelled} labelled, {summary.unsure} unsure, {len(summary.conflicts)} in conflict; "
        f"{summary.changed} automatic label(s) changed or withdrawn"
    )
    if summary.damaged:
        lines = ", ".join(map(str, summary.damaged[:10]))
        say(f"warning: {len(summary.damaged)} unreadable line(s) of reviews.jsonl skipped (line {lines})")
    if summary.unmatched:
        say(f"{summary.unmatched} reviewed question_id(s) are not in this run")
    if summary.conflicts:
        shown = "; ".join(f"{qid}: {reason}" for qid, reason in summary.conflicts[:5])
        say(
            f"{len(summary.conflicts)} conflict(s) left unknown (pass --resolve latest to take the latest "
            f"decision): {shown}{' ...' if len(summary.conflicts) > 5 else ''}"
        )
    if summary.resolved:
        say(f"{len(summary.resolved)} conflict(s) resolved by the latest decision")
    rows = [*summary.automatic, *summary.reviewer_pairs]
    if not rows:
        return
    table = Table("compared", "rows", "agree", "rate", "Cohen's kappa", title="agreement")
    for item in rows:
        rate = f"{item.rate:.1%}" if item.rate is not None else "n/a"
        kappa = f"{item.kappa:.3f}" if item.kappa is not None else "undefined"
        table.add_row(f"{item.first} vs {item.second}", str(item.n), str(item.agree), rate, kappa)
    console.print(table)
