"""One precision vocabulary (ftz_edge.precision) and command lines generated from the options
dataclasses (ftz_edge.cli.args.DataclassOptions): ftz-export from ExportOptions, ftz-serve from
ServeConfig, ftz-eval from EvalConfig. A field is on the command line or explicitly skipped; the
flags and defaults are the ones the hand-written parsers had."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import pytest

from ftz_edge import precision as P
from ftz_edge.cli.args import DataclassOptions, Flag, OneLineParser
from ftz_edge.export import bundle as bundle_module
from ftz_edge.export.bundle import ExportOptions

# What the hand-written parsers accepted (before they were generated): exactly these, no more.
EXPORT_FLAGS = {"--checkpoint", "--out", "--engine", "--precision", "--llm-precision", "--llm-provider", "--llm-block-size",
                "--calib-images",
                "--calib-method", "--max-calib-images", "--validation-images", "--sensitivity", "--no-sensitivity",
                "--int8-quantize-fusion", "--no-cpu-int8", "--batch-min", "--batch-opt", "--batch-max", "--workspace-gb",
                "--timing-cache", "--strict"}
SERVE_FLAGS = {"--bundle", "--host", "--port", "--api-key", "--model-name", "--allow-local-files", "--max-request-mb",
               "--max-image-pixels", "--max-images", "--max-tokens-limit", "--default-max-tokens", "--default-temperature",
               "--queue-size", "--max-queued-mb", "--image-cache-mb", "--provider", "--no-warmup", "--log-level"}


def option_strings(parser) -> set:
    return {s for action in parser._actions for s in action.option_strings if s not in ("-h", "--help")}


def other_value(options: DataclassOptions, f: dataclasses.Field, default):
    """An option value (as typed) different from the default, and the field value it must give."""
    kwargs = options._specs[f.name]["kwargs"]
    if kwargs.get("action") in ("store_true", "store_false"):
        return [], not default
    if "choices" in kwargs:
        value = next(c for c in kwargs["choices"] if c != default)
        return [str(value)], value  # typed as text, parsed to the choice's type
    inner = typing.get_args(typing.get_type_hints(ExportOptions)[f.name]) or (typing.get_type_hints(ExportOptions)[f.name],)
    if int in inner:
        return [str((default or 0) + 3)], (default or 0) + 3
    if float in inner:
        return [str(default + 1.5)], default + 1.5
    return ["/some/where"], "/some/where"


# -- ftz-export ------------------------------------------------------------------------------

def test_export_parser_has_exactly_the_old_flags_and_every_field():
    parser, options = bundle_module.export_parser()
    assert option_strings(parser) == EXPORT_FLAGS
    assert set(options.exposed) == {f.name for f in dataclasses.fields(ExportOptions)}  # nothing skipped
    assert options.exposed["cpu_int8"] == "--no-cpu-int8" and options.exposed["strict"] == "--strict"


def test_export_parse_of_nothing_is_the_default_options():
    parser, options = bundle_module.export_parser()
    assert bundle_module.options_from_args(options, parser.parse_args([])) == ExportOptions()


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(ExportOptions)])
def test_every_export_field_round_trips_through_its_option(name):
    parser, options = bundle_module.export_parser()
    f = next(f for f in dataclasses.fields(ExportOptions) if f.name == name)
    default = getattr(ExportOptions(), name)
    argv, expected = other_value(options, f, default)
    if name == "batch_min":  # 1 <= min <= opt <= max is the TensorRT spec's check, not the parser's
        argv, expected = ["2"], 2
    parsed = bundle_module.options_from_args(options, parser.parse_args([options.exposed[name], *argv]))
    assert getattr(parsed, name) == expected
    assert dataclasses.replace(parsed, **{name: default}) == ExportOptions()  # nothing else moved


def test_export_aliases():
    parser, options = bundle_module.export_parser()
    parsed = bundle_module.options_from_args(options, parser.parse_args(["--no-sensitivity", "--sensitivity", "blocks"]))
    assert parsed.sensitivity == "off"  # --no-sensitivity wins, as it did
    assert options.build(parser.parse_args(["--no-cpu-int8"])).cpu_int8 is False


def test_export_help_keeps_each_options_help(capsys):
    parser, _ = bundle_module.export_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for phrase in ("FtZ checkpoint folder (default: the shipped default model)", "bundle folder to write",
                   "auto: TensorRT when importable", "vision tower precision", "execution provider the LLM is built for",
                   "folder of real images for INT8 calibration", "calibration images the parity checks run on",
                   "INT8 sensitivity report", "same as --sensitivity off", "quantize the FtZ fusion modules too",
                   "skip the CPU form of the tower", "TensorRT timing cache file", "a missed parity target is an error",
                   "{fp32,fp16,int8}", "{fp32,fp16,int8,int4,int8-dynamic}"):
        assert phrase in text, phrase


@pytest.mark.parametrize("argv, names", [
    (["--precision", "fp8"], P.VISION_PRECISIONS),
    (["--llm-precision", "int3"], P.LLM_PRECISIONS),
])
def test_an_invalid_precision_is_one_line_listing_the_valid_names(capsys, argv, names):
    with pytest.raises(SystemExit) as exit:
        bundle_module.main(argv)
    assert exit.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ftz-export: error:"), lines
    assert argv[1] in lines[0] and all(name in lines[0] for name in names), lines


def test_export_options_check_the_same_choices_as_the_command_line():
    with pytest.raises(bundle_module.ExportError, match=r"^--precision must be one of fp32, fp16, int8, got 'fp8'$"):
        ExportOptions(precision="fp8")
    with pytest.raises(bundle_module.ExportError, match="--llm-precision must be one of fp32, fp16, int8, int4"):
        ExportOptions(llm_precision="q4_0")
    with pytest.raises(bundle_module.ExportError, match="--llm-provider must be one of cpu, cuda"):
        ExportOptions(llm_provider="tpu")
    assert ExportOptions(llm_provider=None).llm_provider is None


# -- ftz-serve and ftz-eval ------------------------------------------------------------------

def test_serve_parser_has_exactly_the_old_flags_and_defaults(monkeypatch):
    from ftz_edge.serve import server

    monkeypatch.delenv("FTZ_SERVE_API_KEY", raising=False)
    parser, options = server.serve_parser()
    assert option_strings(parser) == SERVE_FLAGS
    assert set(options.exposed) | {"verify"} == {f.name for f in dataclasses.fields(server.ServeConfig)}
    assert {name: options.exposed[name] for name in server.CLI_OPTION} == server.CLI_OPTION
    assert options.build(parser.parse_args([])) == server.ServeConfig()
    config = options.build(parser.parse_args(["--max-request-mb", "1.5", "--max-queued-mb", "3", "--no-warmup",
                                              "--provider", "A", "--provider", "B", "--allow-local-files", "/x",
                                              "--api-key", ""]))
    assert config.max_request_bytes == int(1.5 * server.MiB) and config.max_queued_bytes == 3 * server.MiB
    assert config.warmup is False and config.providers == ["A", "B"] and config.allow_local_files == ["/x"]
    assert config.api_key is None  # an empty key is no key, as before


def test_serve_api_key_defaults_to_the_environment(monkeypatch):
    from ftz_edge.serve import server

    monkeypatch.setenv("FTZ_SERVE_API_KEY", "secret")
    parser, options = server.serve_parser()
    assert options.build(parser.parse_args([])).api_key == "secret"


def test_eval_parser_covers_every_config_field():
    from ftz_edge.evaluation import cli

    options = cli._options()
    parser = cli.build_parser(options)
    assert set(options.exposed) == {f.name for f in dataclasses.fields(cli.EvalConfig)}
    config = options.build(parser.parse_args(["--out", "o", "--synthetic", "5", "--model", "a", "--no-progress"]))
    assert config == cli.EvalConfig(models=["a"], out=Path("o"), synthetic=5, progress=False)


# -- the generator itself --------------------------------------------------------------------

@dataclass
class Example:
    name: str = field(default="x", metadata={"help": "a name", "choices": ("x", "y")})
    count: Optional[int] = None
    ratio: float = 0.5
    folder: Path = Path("here")
    on: bool = True
    off: bool = False
    tags: List[str] = field(default_factory=list)
    internal: int = 0


def test_generated_options_from_field_types_and_metadata():
    options = DataclassOptions(Example, skip=("internal",), flags={"tags": Flag(flag="--tag")})
    parser = OneLineParser(prog="example")
    options.add_to(parser)
    assert options.exposed == {"name": "--name", "count": "--count", "ratio": "--ratio", "folder": "--folder",
                               "on": "--no-on", "off": "--off", "tags": "--tag"}
    assert options.build(parser.parse_args([])) == Example()
    built = options.build(parser.parse_args(["--name", "y", "--count", "3", "--ratio", "2", "--folder", "f", "--no-on",
                                             "--off", "--tag", "a", "--tag", "b"]))
    assert built == Example("y", 3, 2.0, Path("f"), False, True, ["a", "b"])
    assert options.build(parser.parse_args([]), internal=7).internal == 7


def test_a_non_finite_float_option_is_refused(capsys):
    options = DataclassOptions(Example, skip=("internal",))
    parser = OneLineParser(prog="example")
    options.add_to(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--ratio", "nan"])
    assert "must be a finite number" in capsys.readouterr().err


def test_a_field_the_generator_cannot_spell_is_caught_when_the_parser_is_built():
    @dataclass
    class WithNewField(ExportOptions):
        shapes: dict = field(default_factory=dict)  # added without thinking of the command line

    with pytest.raises(TypeError, match="WithNewField.shapes: cannot make an option"):
        DataclassOptions(WithNewField)
    assert "shapes" not in DataclassOptions(WithNewField, skip=("shapes",)).exposed  # explicitly skipped: fine

    @dataclass
    class WithNewInt(ExportOptions):
        tiles: int = 4

    assert DataclassOptions(WithNewInt).exposed["tiles"] == "--tiles"  # a plain field is exposed by itself


def test_skip_and_flags_must_name_fields():
    with pytest.raises(TypeError, match="has no field nmae"):
        DataclassOptions(Example, skip=("nmae",))
    with pytest.raises(TypeError, match="has no field colour"):
        DataclassOptions(Example, flags={"colour": Flag(help="?")})


def test_a_field_left_out_of_every_parser_is_caught():
    options = DataclassOptions(Example)
    parser = OneLineParser(prog="example")
    options.add_to(parser, only=("name",))
    with pytest.raises(TypeError, match="Example.count .--count. was never added"):
        options.build(parser.parse_args([]))


# -- the vocabulary --------------------------------------------------------------------------

def test_every_precision_table_covers_the_vocabulary():
    from ftz_edge.doctor import memory_budget as mb
    from ftz_edge.export import llm as llm_export
    from ftz_edge.export.validate import VISION_TARGETS

    assert tuple(VISION_TARGETS) == P.VISION_PRECISIONS
    assert tuple(mb.TOWER_BYTES_PER_WEIGHT) == P.VISION_PRECISIONS
    assert tuple(llm_export.BUILDER_TARGETS) == P.LLM_PRECISIONS == tuple(P.LLM_WEIGHT_BITS)
    assert [mb.llm_bytes_per_weight(p, "cpu") for p in P.LLM_PRECISIONS] == [4.0, 2.0, (8 + 40 / 32) / 8, (4 + 36 / 32) / 8, 1.0]
    fields = {f.name: f for f in dataclasses.fields(ExportOptions)}
    assert fields["precision"].metadata["choices"] == P.VISION_PRECISIONS
    assert fields["llm_precision"].metadata["choices"] == P.LLM_PRECISIONS


def test_parse_names_the_valid_precisions():
    assert P.parse_vision("int8") == "int8" and P.parse_llm("int4") == "int4"
    with pytest.raises(P.PrecisionError, match=r"^LLM precision must be one of fp32, fp16, int8, int4, int8-dynamic, got 'int3'$"):
        P.parse_llm("int3")
    with pytest.raises(ValueError, match="vision precision must be one of fp32, fp16, int8, got 'int4'"):
        P.parse_vision("int4")
    with pytest.raises(ValueError, match="LLM precision must be one of"):
        from ftz_edge.export.llm import check_target

        check_target("bf16", "cpu")
    with pytest.raises(ValueError, match="tower precision must be one of fp32, fp16, int8"):
        from ftz_edge.doctor.memory_budget import plan_spec

        plan_spec(tower_precision="int4")


def test_the_vocabulary_and_the_generator_are_torch_free():
    code = ("import sys, ftz_edge.precision, ftz_edge.cli.args, ftz_edge.doctor.memory_budget; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
