"""`sdcompile`: export, optimize, inspect and build Stable Diffusion components.

Each command parses its options, builds a config and calls one library function.
"""
from __future__ import annotations

import json
from pathlib import Path

import click

from sdcompile import __version__
from sdcompile.options import DEFAULT_OPSET, AttentionImpl, AttentionTarget, Precision
from sdcompile.cli_debug import register as register_debug
from sdcompile.cli_trt import register as register_trt
from sdrun.errors import UserError, debug_option, run_cli


@click.group(name="sdcompile", context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sdcompile")
@debug_option()
def cli(debug) -> None:
    """Compile Stable Diffusion checkpoints into verified ONNX graphs and TensorRT engines.

    \b
    Typical flow:
      sdcompile export --recipe sd15 --checkpoint v1-5.safetensors --component all --out bundle/
      sdcompile inspect bundle/
      sdcompile build-trt bundle/
      sdrun txt2img --bundle bundle/ --prompt "a lighthouse at dawn"
    """


@cli.command("recipes")
def recipes_command() -> None:
    """List the built-in recipes."""
    from sdcompile.recipes import available_recipes, load_recipe

    for name in available_recipes():
        click.echo(f"{name:10s} {load_recipe(name).description}")


@cli.command("export")
@click.option("--recipe", required=True, help="recipe name (see `sdcompile recipes`) or path to a .toml file")
@click.option("--checkpoint", type=click.Path(path_type=Path), help=".safetensors/.ckpt file or diffusers folder")
@click.option("--random-weights", is_flag=True, help="seeded random weights instead of a checkpoint")
@click.option("--seed", type=int, default=0, show_default=True, help="seed for --random-weights")
@click.option("--component", "components", multiple=True, default=("all",), show_default=True,
              help="text_encoder | text_encoder_2 (SDXL) | unet | unet_step | vae_decoder | vae_encoder | all (repeatable)")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="bundle directory to write")
@click.option("--precision", type=click.Choice([p.value for p in Precision]), default="fp32", show_default=True)
@click.option("--opset", type=int, default=DEFAULT_OPSET, show_default=True, help="ONNX opset (>= 23 for fused attention)")
@click.option("--attention", type=click.Choice([a.value for a in AttentionImpl]), default="sdpa", show_default=True,
              help="attention as traced: sdpa (exports as Attention) or explicit MatMul-Softmax-MatMul")
@click.option("--attention-target", type=click.Choice([t.value for t in AttentionTarget]), default="onnx",
              show_default=True, help="fused attention op: standard ONNX Attention or com.microsoft MultiHeadAttention")
@click.option("--no-verify", is_flag=True, help="skip the ONNX Runtime vs eager PyTorch accuracy gate")
@click.option("--force", is_flag=True, help="replace a bundle made from another recipe or checkpoint")
@click.option("--external-data", is_flag=True,
              help="always write weights to model.onnx.data beside each graph (else only past protobuf's 2 GiB)")
@click.option("--lora", "loras", multiple=True, metavar="FILE[:SCALE]",
              help="merge a LoRA (.safetensors, kohya or diffusers layout) into the weights, SCALE default 1 "
                   "(repeatable)")
@click.option("--fp32-islands", metavar="NODE,NODE,...",
              help="fp16: also keep these nodes in fp32 (names as `sdcompile debug precision` prints them)")
@click.option("--no-fp32-islands", is_flag=True, hidden=True,
              help="fp16: no op-type islands and no range finder (to test `sdcompile debug precision`)")
def export_command(recipe, checkpoint, random_weights, seed, components, out, precision, opset, attention,
                   attention_target, no_verify, force, external_data, loras, fp32_islands, no_fp32_islands) -> None:
    """Export components of a Stable Diffusion model into a verified ONNX bundle."""
    from sdcompile.bundler import ExportConfig, export_bundle
    from sdcompile.recipes import load_recipe
    from sdcompile.weights import RandomWeights
    from sdrun.lora import parse_lora_option

    if bool(checkpoint) == random_weights:
        raise UserError("choose the weights: exactly one of --checkpoint PATH and --random-weights.",
                        got="both" if checkpoint else "neither", fix="add --checkpoint PATH or --random-weights")
    config = ExportConfig(recipe=load_recipe(recipe), source=checkpoint or RandomWeights(seed), out=out,
                          components=components, precision=Precision(precision), opset=opset,
                          attention=AttentionImpl(attention), attention_target=AttentionTarget(attention_target),
                          verify=not no_verify, force=force, external_data=external_data,
                          loras=tuple(parse_lora_option(text) for text in loras),
                          fp32_islands=_node_names(fp32_islands), default_fp32_islands=not no_fp32_islands)
    if (fp32_islands or no_fp32_islands) and config.precision is not Precision.FP16:
        raise UserError("--fp32-islands choose what an fp16 export keeps in fp32, and this export is fp32.",
                        fix="add --precision fp16, or drop the island options")
    manifest = export_bundle(config, log=lambda line: click.echo(line, err=True))
    click.echo(f"wrote {out} ({', '.join(manifest.components)})")


def _node_names(text: str | None) -> tuple[str, ...]:
    return tuple(name.strip() for name in (text or "").split(",") if name.strip())


@cli.command("optimize")
@click.argument("source", type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="optimized .onnx to write")
@click.option("--passes", help="comma-separated, in order: cleanup,fuse-attention,fp16 [default: by precision]")
@click.option("--precision", type=click.Choice([p.value for p in Precision]), default="fp32", show_default=True)
@click.option("--attention-target", type=click.Choice([t.value for t in AttentionTarget]), default="onnx",
              show_default=True)
def optimize_command(source, out, passes, precision, attention_target) -> None:
    """Run the graph passes on any SD-style ONNX file (including ones we did not export)."""
    from sdcompile.optimize import OptimizeConfig, optimize_file

    config = OptimizeConfig(source=source, out=out, precision=Precision(precision),
                            passes=tuple(p.strip() for p in passes.split(",") if p.strip()) if passes else None,
                            attention_target=AttentionTarget(attention_target))
    result = optimize_file(config)
    attention = result["reports"].get("fuse-attention")
    if attention:
        click.echo(f"attention: {json.dumps(attention)}", err=True)
    click.echo(f"wrote {out} ({', '.join(result['passes'])})")


@cli.command("inspect")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def inspect_command(path, as_json) -> None:
    """Show a bundle's or an ONNX file's components, I/O, ops, attention and precision."""
    from sdcompile.inspection import format_summary, inspect_path

    summary = inspect_path(path)
    click.echo(json.dumps(summary, indent=2) if as_json else format_summary(summary))


@cli.command("triton-repo")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="repository directory to create")
@click.option("--components", "kind", type=click.Choice(["onnxruntime", "tensorrt", "python"]), default="onnxruntime",
              show_default=True, help="how the component models run: Triton's ONNX Runtime or TensorRT backend, "
                                      "or Python-backend models on sdrun's ONNX Runtime runner")
@click.option("--instances", type=click.IntRange(min=1), default=1, show_default=True,
              help="instances per model (Triton's instance_group count)")
def triton_repo_command(bundle, out, kind, instances) -> None:
    """Write a Triton model repository: one model per component and a BLS `pipeline` model (txt2img).

    \b
    Example:
      sdcompile triton-repo bundle/ --out repo/ --components python
      tritonserver --model-repository repo/
    """
    from sdcompile.triton_repo import ComponentKind, write_repository

    models = write_repository(bundle, out, ComponentKind(kind), instances)
    click.echo(f"wrote {out} ({', '.join(models)})")


register_trt(cli)
register_debug(cli)


def main(args=None) -> None:
    run_cli(cli, args)
