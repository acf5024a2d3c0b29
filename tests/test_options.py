"""ScanOptions: every option validated once, errors naming the parameter; the command line
shows the same errors with its flags."""

import math

import pytest
from click.testing import CliRunner

from ddiscan.cli import FLAGS, cli
from ddiscan.check import LIMITS
from ddiscan.cli.options import LIBRARY_ONLY, SCAN_FLAGS
from ddiscan.errors import UsageError
from ddiscan.options import OptionError, ScanOptions

BAD = [
    (dict(t=2, t_mult=2.0), "give t or t_mult, not both", "give --t or --t-mult, not both"),
    (dict(t=0), "t must be at least 1", "--t must be at least 1"),
    (dict(t_mult=-1.0), "t_mult must be positive", "--t-mult must be positive"),
    (dict(t_mult=math.inf), "t_mult must be positive", "--t-mult must be positive"),
    (dict(power_iters=-1), "oversample and power_iters must be non-negative",
     "--oversample and --power-iters must be non-negative"),
    (dict(krylov_iters=-1), "krylov_iters must be non-negative", "--krylov-iters must be non-negative"),
    (dict(sketch="lanczos"), "sketch must be 'krylov' or 'subspace', not 'lanczos'",
     "--sketch must be 'krylov' or 'subspace', not 'lanczos'"),
    (dict(magnitude="huge"), "magnitude must be 'bounded' or 'raw', not 'huge'",
     "--magnitude must be 'bounded' or 'raw', not 'huge'"),
    (dict(alpha=math.nan), "alpha must be a finite number, not nan", "--alpha must be a finite number, not nan"),
    (dict(alpha=1.0, scaling=2.0), "give alpha or scaling, not both", "give --alpha or --scaling, not both"),
    (dict(threads=0), "threads must be at least 1", "--threads must be at least 1"),
    (dict(method="safelora"), "method safelora needs both aligned and unaligned",
     "--method safelora needs both --aligned and --unaligned"),
    (dict(aligned="a"), "aligned/unaligned are for method safelora or splora",
     "--aligned/--unaligned are for --method safelora or splora"),
    (dict(method="splora", aligned="a", unaligned="b", components=("S",)),
     "components is DDI's ablation; use it with method ddi", "--components is DDI's ablation; use it with --method ddi"),
    (dict(samples=1), "samples must be at least 2", "--samples must be at least 2"),
]


@pytest.mark.parametrize("given, library, cli_message", BAD)
def test_a_bad_option_is_refused_naming_the_parameter(given, library, cli_message):
    with pytest.raises(OptionError) as info:
        ScanOptions(**given)
    assert isinstance(info.value, UsageError) and info.value.exit_code == 2
    assert str(info.value) == library
    assert info.value.render(FLAGS) == cli_message
    assert "--" not in str(info.value)


def test_the_defaults_are_valid_and_every_field_has_a_flag():
    options = ScanOptions()
    assert (options.oversample, options.power_iters, options.method) == (8, 4, "ddi")
    assert set(ScanOptions.names()) - set(LIBRARY_ONLY) <= set(FLAGS)
    for name in (*SCAN_FLAGS, *LIMITS, "profile_sha256"):
        assert FLAGS[name] == "--" + name.replace("_", "-"), name


def test_each_parameter_has_one_flag_in_every_command():
    for command in cli.commands.values():
        for param in command.params:
            long = [o for o in param.opts if o.startswith("--")]
            short = [o for o in param.opts if not o.startswith("--")]
            if long:  # the same in every command: -o/--output, --t, --mode (not its alias)
                assert FLAGS[param.name] == "/".join([*short[:1], long[0]]), (command.name, param.name)


def test_every_scan_option_is_a_flag_of_every_scanning_command_with_the_fields_default():
    assert sorted([*SCAN_FLAGS, *LIBRARY_ONLY]) == sorted(ScanOptions.names())
    defaults = ScanOptions()
    for command in ("report", "check", "prune"):
        params = {p.name: p for p in cli.commands[command].params}
        for name in SCAN_FLAGS:
            assert params[name].opts == [FLAGS[name]], (command, name)
            assert params[name].default == getattr(defaults, name), (command, name)
        assert not set(LIBRARY_ONLY) & set(params), command


def test_a_limit_of_check_is_refused_naming_the_parameter_and_shown_as_its_flag():
    from ddiscan.check import check

    with pytest.raises(OptionError) as info:
        check(["fixtures/tiny-lora"], base="fixtures/tiny-llama", method="safelora")
    assert str(info.value) == "give min_cosine"
    assert info.value.render(FLAGS) == "give --min-cosine"
    result = CliRunner().invoke(cli, ["check", "fixtures/tiny-lora"])
    assert result.exit_code == 2 and result.stderr == "Error: give --max-ddi and/or --max-ddi-norm\n"


def test_the_command_line_prints_the_library_error_with_its_flags():
    result = CliRunner().invoke(cli, ["report", "fixtures/tiny-llama", "fixtures/tiny-lora", "--t", "2",
                                      "--t-mult", "2"])
    assert result.exit_code == 2
    assert result.stderr == "Error: give --t or --t-mult, not both\n"


def test_options_are_keyword_only_and_frozen():
    with pytest.raises(TypeError):
        ScanOptions(4)
    with pytest.raises(AttributeError):
        ScanOptions().t = 3
