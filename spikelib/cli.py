"""The command line of every stage, built from its config dataclasses.

Each config field becomes an option `--name`; its help text is the comment written beside the
field in the stage (so the stage's config stays the one place that explains an option), followed
by its default and, for preset fields, each preset's value where it differs.
"""
import argparse
import inspect
import io
import re
import sys
import tokenize
from dataclasses import MISSING, fields

FIELD = re.compile(r"^\s+(\w+)\s*:")


def parse_bool(text):
    """0/1/true/false -> bool (argparse's type=bool would turn "0" into True)."""
    if str(text).lower() not in ("0", "1", "true", "false"):
        raise argparse.ArgumentTypeError(f"expected 0/1/true/false, got {text!r}")
    return str(text).lower() in ("1", "true")


def field_comments(cls):
    """{field name: the comment on its line in the class source}; a comment-only line right after
    a field continues that field's comment."""
    comments, current = {}, None
    source = inspect.getsource(cls)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.NAME and tok.start[1] == 4 and FIELD.match(tok.line):
            current = tok.string if tok.line.lstrip().startswith(tok.string) else current
        elif tok.type == tokenize.COMMENT and current:
            text = tok.string.lstrip("#").strip()
            if tok.line.strip().startswith("#"):              # a continuation line
                comments[current] = (comments.get(current, "") + " " + text).strip()
            else:
                comments[current] = text
        elif tok.type == tokenize.NL and not tok.line.strip():
            current = None                                     # a blank line ends a comment
    return comments


def field_type(f):
    """The argparse type of a dataclass field: its declared type, bools through parse_bool."""
    kind = {"bool": bool, "int": int, "float": float, "str": str}.get(f.type, f.type)
    return parse_bool if kind is bool else kind


def field_setting(config_cls):
    """An argparse type for NAME=VALUE: a field of the dataclass config_cls, VALUE parsed as the
    field's type; a bad one is argparse's one error line naming the fields."""
    kinds = {f.name: field_type(f) for f in fields(config_cls)}

    def parse(text):
        name, _, value = text.partition("=")
        if name not in kinds or not value:
            raise argparse.ArgumentTypeError(f"{text!r}: give NAME=VALUE for a field of "
                                             f"{config_cls.__name__}, one of {list(kinds)}")
        try:
            return name, kinds[name](value)
        except ValueError:                       # int("abc"), float("x"): parse_bool says its own
            words = {int: "a whole number", float: "a number"}.get(kinds[name], kinds[name].__name__)
            raise argparse.ArgumentTypeError(f"{text!r}: {name} must be {words}") from None
    return parse


def bool_option(parser, name, **kwargs):
    """--name alone means 1, --name 0|1 sets it, and a hidden --no-name means 0."""
    parser.add_argument(f"--{name}", type=parse_bool, nargs="?", const=True, metavar="0|1", **kwargs)
    parser.add_argument(f"--no-{name}", dest=name, action="store_const", const=False,
                        default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def add_config_options(parser, cls, title, presets=None, section=None, dashed=False):
    """One option per field of cls. With presets ({name: {section: {field: value}}}), an option not
    given keeps the preset's value: its default is None and its help lists each preset's value.
    dashed: each option may also be written with dashes (--vocab-size for --vocab_size)."""
    names = [f.name for f in fields(cls) if "_" in f.name]
    note = (f"each option may also be written with dashes: --{names[0].replace('_', '-')} for "
            f"--{names[0]}") if dashed and names else None
    group = parser.add_argument_group(title, note)
    comments = field_comments(cls)
    for f in fields(cls):
        default = f.default if f.default is not MISSING else f.default_factory()
        note = f"default {default!r}"
        if presets:
            values = {name: p.get(section, {}).get(f.name, default) for name, p in presets.items()}
            if len(set(map(repr, values.values()))) > 1:
                note = "by preset: " + ", ".join(f"{name} {value!r}" for name, value in values.items())
        help_text = f"{comments.get(f.name, '')} ({note})".strip().replace("%", "%%")
        kind = field_type(f)
        if kind is parse_bool:
            bool_option(group, f.name, default=None if presets else default, help=help_text)
        else:
            metavar = {int: "N", float: "X"}.get(kind, "TEXT")
            group.add_argument(f"--{f.name}", type=kind, default=None if presets else default,
                               metavar=metavar, help=help_text)
        if dashed and "_" in f.name:
            group.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=kind, metavar=f.name,
                               default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return group


def given_options(args, *classes):
    """{field: value} for the fields of classes that were given on the command line (not None)."""
    names = {f.name for cls in classes for f in fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names and v is not None}


def config_from_args(cls, args):
    """An instance of cls from the parsed options of its fields (defaults already filled in)."""
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


def resumed_config(cls, saved, overrides, fallback):
    """The run's own saved settings, with only the options given now changed: a resumed run keeps
    its schedule unless asked. Fields the saved run did not have take fallback's values."""
    return cls(**{f.name: overrides.get(f.name, saved.get(f.name, getattr(fallback, f.name)))
                  for f in fields(cls)})


RANGE = re.compile(r"^(?:(>=|>) (-?[\d.e-]+)|in ([\[(])(-?[\d.e-]+), (-?[\d.e-]+)([\])]))")


def allowed(value, rule):
    """Whether a number meets a rule written as its --help would say it: ">= 1", "> 0",
    "in [0, 1)" (a note may follow the rule). NaN meets none."""
    m = RANGE.match(rule)
    if m is None:
        raise ValueError(f"unreadable rule {rule!r}")
    op, low, left, lo, hi, right = m.groups()
    if op:
        return value >= float(low) if op == ">=" else value > float(low)
    above_low = value >= float(lo) if left == "[" else value > float(lo)
    below_high = value <= float(hi) if right == "]" else value < float(hi)
    return above_low and below_high


def check_fields(cfg, rules):
    """rules: {field: rule for allowed()}. The first field whose value breaks its rule is a
    ValueError naming the option: "--lr must be > 0, got -1.0"."""
    for name, rule in rules.items():
        value = getattr(cfg, name)
        if not allowed(value, rule):
            raise ValueError(f"--{name} must be {rule}, got {value!r}")


def check_choices(cfg, choices):
    """choices: {field: allowed values}; a value outside them is a ValueError naming the option."""
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"--{name} must be one of {', '.join(allowed)}, got {getattr(cfg, name)!r}")


def fail(err, code=1):
    """Report an expected error as one line on stderr and return the exit code."""
    print(f"error: {err}", file=sys.stderr)
    return code


def add_run_options(parser, presets):
    """The options every training stage shares before its config fields."""
    parser.add_argument("--preset", default="quick", choices=list(presets),
                        help="a named model size and schedule; the options below change single fields of it")
    bool_option(parser, "resume", default=False,
                help="continue the run saved in the checkpoint, with its settings unless given here")
    parser.add_argument("--ckpt", default=None, help="checkpoint file (default: OUT_DIR/ckpt.npz)")
    bool_option(parser, "overwrite", default=False,
                help="start a new run even where the checkpoint file already holds one, replacing it")
    parser.add_argument("--generate", default=None, metavar="PROMPT",
                        help="only stream text after PROMPT from the checkpoint (no training)")
    bool_option(parser, "plot", default=False,
                help="draw PNGs of the run beside its checkpoint (curves, spike rates, a raster, "
                     "head decays; needs matplotlib): after training, or, on an existing "
                     "checkpoint without --resume/--overwrite, instead of training")


def preset_configs(presets, preset, overrides, **classes):
    """One config per section of a preset ({section: class}, in that order), each with the fields
    of overrides that belong to it changed; an unknown preset or field is refused."""
    if preset not in presets:
        raise ValueError(f"unknown preset {preset!r}; choose one of {list(presets)}")
    known = {f.name for cls in classes.values() for f in fields(cls)}
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(f"unknown config fields {sorted(unknown)}")
    configs = []
    for section, cls in classes.items():
        mine = {k: v for k, v in overrides.items() if k in {f.name for f in fields(cls)}}
        configs.append(cls(**dict(presets[preset][section], **mine)))
    return tuple(configs)


def stage_parser(doc, presets, sample_cls, model_cls, train_cls):
    """The command line of a training stage (3, 4, 5): the run options, then one option per field
    of its sampling, model and training configs. Stages add their own groups to it."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_options(ap, presets)
    add_config_options(ap, sample_cls, "sampling (SampleConfig)")
    add_config_options(ap, model_cls, "model (ModelConfig)", presets, "model")
    add_config_options(ap, train_cls, "training (TrainConfig)", presets, "train")
    return ap
