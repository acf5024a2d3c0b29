"""``ddiscan profile``: what scoring needs from a base, in a small file."""

from __future__ import annotations

import sys

import click

from ..io.writer import refuse_input_as_output
from ..profile import DEFAULT_EXCLUDE, build_profile
from .options import PathType, scan_option


@click.command()
@click.argument("base", type=PathType())
@click.option("-o", "--output", type=PathType(output=True, dir_okay=False), required=True,
              help="The profile to write (a .ddiprofile file).")
@click.option("--max-t", type=click.IntRange(min=1), default=64, show_default=True,
              help="Widest subspace stored; any t up to MAX_T can be scored.")
@click.option("--include", multiple=True, help="Only weights whose key matches this glob (repeatable).")
@click.option("--exclude", multiple=True, help="Skip weights whose key matches this glob (repeatable).  "
              "[default: embeddings, LM head, norms]")
@scan_option("oversample")
@scan_option("sketch")
@scan_option("krylov_iters")
@scan_option("power_iters")
@scan_option("seed", help="Seed of the random test matrices.")
@scan_option("exact", help="Subspaces from full float64 SVDs.")
@click.option("--force", is_flag=True, help="Replace an existing output.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar, and no 'wrote' line on stderr.")
def profile(base, output, max_t, include, exclude, oversample, sketch, krylov_iters, power_iters, seed, exact, force,
            quiet):
    """Store what scoring needs from BASE in a small profile, to check adapters without it.

    For each weight a LoRA could target: its shape, its Frobenius norm and orthonormal
    bases of its dominant column and row spaces up to --max-t, plus the sketch
    parameters and the base files' names, sizes and sha256.
    """
    refuse_input_as_output(output, [base])
    summary = build_profile(
        base, output, max_t=max_t, include=include, exclude=exclude or DEFAULT_EXCLUDE, oversample=oversample,
        sketch=sketch, krylov_iters=krylov_iters, power_iters=power_iters, seed=seed, exact=exact, force=force,
        progress=not quiet and sys.stderr.isatty(),
    )
    share = 100.0 * summary["size"] / summary["base_size"] if summary["base_size"] else 0.0
    if not quiet:
        click.echo(f"wrote {output}: {summary['weights']} weights, {summary['size']} bytes ({share:.1f}% of the base)",
                   err=True)
