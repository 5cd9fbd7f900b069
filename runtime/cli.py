"""`sdrun`: generate images from a compiled bundle (no torch needed)."""
from __future__ import annotations

import click

from sdrun import __version__
from sdrun.errors import run_cli


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sdrun")
def cli() -> None:
    """Run Stable Diffusion from a bundle made by `sdcompile export`.

    \b
    Example:
      sdrun txt2img --bundle bundle/ --prompt "a lighthouse at dawn" --out out.png
    """


def main(args=None) -> None:
    run_cli(cli, args)
