"""`sdcompile build-trt`: TensorRT engines for a bundle's components."""
from __future__ import annotations

from pathlib import Path

import click

from sdcompile.trt import AttentionPath, BuildOptions, BuildRequest, build_engines
from sdcompile.trt_profiles import ShapeMode, ShapeRequest, parse_shape_override
from sdrun.backends.tensorrt import ATTENTION_TENSORRT
from sdrun.engine_files import LEVELS

SHAPE_HELP = "profile {} shapes as AXIS=VALUE pairs, e.g. batch=2,height=768,width=768 (recipe's value where absent)"


@click.command("build-trt")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--component", "components", multiple=True, default=("all",), show_default=True,
              help="component to build (repeatable), or all")
@click.option("--static", is_flag=True, help="one shape per engine: min = opt = max = --opt (or the recipe's opt)")
@click.option("--min", "min_shapes", metavar="AXIS=N,...", help=SHAPE_HELP.format("minimum"))
@click.option("--opt", "opt_shapes", metavar="AXIS=N,...", help=SHAPE_HELP.format("optimal"))
@click.option("--max", "max_shapes", metavar="AXIS=N,...", help=SHAPE_HELP.format("maximum"))
@click.option("--timing-cache", type=click.Path(dir_okay=False, path_type=Path),
              help="tactic timing cache: read when the file exists, written after each engine")
@click.option("--builder-optimization-level", type=click.IntRange(0, 5),
              help="0 builds fastest, 5 searches most (TensorRT's default: 3)")
@click.option("--max-workspace", type=click.IntRange(min=1), metavar="BYTES",
              help="device memory a layer may use as scratch while building (default: all of it)")
@click.option("--attention", type=click.Choice([p.value for p in AttentionPath]),
              default=AttentionPath.DECOMPOSED.value, show_default=True,
              help="attention as the parser sees it: MatMul-Softmax-MatMul, or the ONNX Attention operator "
                   f"(TensorRT >= {'.'.join(map(str, ATTENTION_TENSORRT))})")
@click.option("--tf32", is_flag=True, help="let fp32 matrix products and convolutions use TF32 (10-bit mantissa "
                                           "inputs); off by default, so fp32 engines compute in fp32")
@click.option("--refittable", is_flag=True, help="engines whose weights sdrun can replace at run time (--lora)")
def build_trt_command(bundle, components, static, min_shapes, opt_shapes, max_shapes, timing_cache,
                      builder_optimization_level, max_workspace, attention, tf32, refittable) -> None:
    """Build TensorRT engines for the components of BUNDLE (needs TensorRT and an NVIDIA GPU).

    \b
    Engines are named by TensorRT version and GPU (unet/engine-trt10.13.0-sm90.plan) and recorded
    in the manifest; sdrun refuses engines built by another TensorRT, for another GPU, or from
    another ONNX graph. Shape ranges come from the recipe: batch in prompts (doubled for
    classifier-free guidance where the graph takes both halves), height and width in pixels.
    """
    texts = dict(zip(LEVELS, (min_shapes, opt_shapes, max_shapes)))
    overrides = {level: parse_shape_override(level, text) for level, text in texts.items() if text}
    shapes = ShapeRequest(ShapeMode.STATIC if static else ShapeMode.DYNAMIC, overrides)
    options = BuildOptions(shapes=shapes, timing_cache=timing_cache, optimization_level=builder_optimization_level,
                           max_workspace=max_workspace, attention=AttentionPath(attention), tf32=tf32,
                           refittable=refittable)
    manifest = build_engines(BuildRequest(bundle, tuple(components), options),
                             log=lambda line: click.echo(line, err=True))
    built = [name for name in manifest.components if name in components or "all" in components]
    click.echo(f"built TensorRT engines for {', '.join(built)} in {bundle}")


def register(cli: click.Group) -> None:
    cli.add_command(build_trt_command)
