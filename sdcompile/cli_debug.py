"""`sdcompile debug`: look inside a bundle's graphs when their numbers go wrong."""
from __future__ import annotations

import json
from pathlib import Path

import click

from sdcompile.debug_precision import DEFAULT_REL_L2
from sdrun.errors import UserError


@click.group("debug")
def debug_group() -> None:
    """Find where a bundle's graphs lose accuracy."""


@debug_group.command("precision")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--component", required=True, help="the fp16 component to compare node by node, e.g. unet")
@click.option("--threshold", type=click.FloatRange(min=0, min_open=True), default=DEFAULT_REL_L2, show_default=True,
              help="relative L2 error past which a node output counts as lost")
@click.option("--scale", "scales", multiple=True, metavar="INPUT=FACTOR",
              help="multiply a sample input, e.g. latent=1000, to push activations toward fp16's range (repeatable)")
@click.option("--seed", type=int, default=0, show_default=True, help="seeds the sample inputs")
@click.option("--top", type=click.IntRange(min=1), default=10, show_default=True, help="nodes listed by error")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path),
              help="also write every node's statistics here")
def precision_command(bundle, component, threshold, scales, seed, top, json_out) -> None:
    """Run an fp16 component and the same graph in fp32 on one sample and report error growth node by node.

    \b
    Prints the first nodes past the threshold and the export argument that keeps them in fp32:
      sdcompile debug precision bundle/ --component vae_decoder --scale latent=1000
      sdcompile export ... --precision fp16 --fp32-islands NODE,NODE
    """
    from sdcompile.debug_precision import debug_bundle_component, format_report

    report = debug_bundle_component(bundle, component, dict(_scale(text) for text in scales), seed, threshold)
    if json_out:
        json_out.write_text(json.dumps(report.to_dict(), indent=2))
    click.echo(format_report(report, top))


def _scale(text: str) -> tuple[str, float]:
    name, _, factor = text.partition("=")
    try:
        return name.strip(), float(factor)
    except ValueError:
        raise UserError(f"--scale {text} is not INPUT=FACTOR.", expected="e.g. --scale latent=1000", got=text,
                        fix="name a component input and a number") from None


def register(cli: click.Group) -> None:
    cli.add_command(debug_group)
