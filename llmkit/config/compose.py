"""Compose a command's config with Hydra (conf/ + a recipe + overrides) into its typed root.

This is the only place that sees DictConfig: commands below receive plain dataclasses.
"""

from __future__ import annotations

import dataclasses
import difflib
import tempfile
from pathlib import Path
from typing import Any

from llmkit.errors import UserError


def config_roots() -> tuple[Path, Path]:
    """The `conf/` and `recipes/` directories: inside the installed package, else the checkout."""
    package = Path(__file__).resolve().parent.parent
    for base in (package, package.parent):
        if (base / "conf").is_dir() and (base / "recipes").is_dir():
            return base / "conf", base / "recipes"
    raise UserError(f"llmkit's conf/ and recipes/ were not found next to {package}; reinstall llmkit")


def list_recipes() -> list[str]:
    """Every shipped recipe as `group/name` (what `llmkit <command> <recipe>` takes)."""
    _, recipes = config_roots()
    return sorted(str(p.relative_to(recipes).with_suffix("")) for p in recipes.rglob("*.yaml"))


def recipe_command(name: str) -> str | None:
    """The command a recipe is written for, read from its `# llmkit <command> ...` header line."""
    _, recipes = config_roots()
    path = recipes / f"{name}.yaml"
    for line in path.read_text().splitlines()[:10]:
        words = line.lstrip("# ").split()
        if len(words) >= 2 and words[0] == "llmkit":
            return words[1]
    return None


def schema_for(command: str) -> type:
    from llmkit.config.schema import ROOTS

    return ROOTS[command]


def compose(command: str, recipe: str | None, overrides: list[str]) -> tuple[Any, str]:
    """Compose `command` with an optional recipe and Hydra overrides.

    Returns (typed root dataclass, resolved YAML text). Raises UserError for any bad input.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    root_type = schema_for(command)
    conf_dir, recipes_dir = config_roots()
    ConfigStore.instance().store(name=f"{command}_schema", node=root_type)
    search_dirs = [recipes_dir]
    extra: list[str] = []
    with tempfile.TemporaryDirectory(prefix="llmkit-recipe-") as scratch:
        if recipe:
            group, option = _recipe_override(recipe, recipes_dir, Path(scratch))
            _refuse_other_commands_recipe(command, f"{group}/{option}" if group != "user" else None)
            if group == "user":
                search_dirs.append(Path(scratch))
            extra.append(f"+{group}={option}")
        searchpath = ",".join(f"file://{d}" for d in search_dirs)
        GlobalHydra.instance().clear()
        try:
            with initialize_config_dir(str(conf_dir), version_base="1.3"):
                cfg = hydra_compose(command, overrides=[f"hydra.searchpath=[{searchpath}]", *extra,
                                                        *_text_as_typed(overrides, root_type)])
            _refuse_added_keys(cfg, root_type)
            typed = OmegaConf.to_object(cfg)
            _write_back_normalised(cfg, typed)
        except UserError:
            raise
        except Exception as error:  # Hydra/OmegaConf raise many types; each becomes one message
            raise UserError(_explain(error, root_type, recipe)) from None
        finally:
            GlobalHydra.instance().clear()
    return typed, OmegaConf.to_yaml(cfg, resolve=True)  # interpolations (${...}) shown and saved as their values


def _text_as_typed(overrides: list[str], root_type: type) -> list[str]:
    """Overrides with the value of a string key quoted where Hydra would read a bool or a number: `prompt=true`,
    `name=1e3` became 'True' and '1000.0' through OmegaConf, a text the user never typed."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    kept = []
    for override in overrides:
        try:
            parsed = parser.parse_override(override)
        except Exception:  # Hydra reports it, with its own message, when it composes
            kept.append(override)
            continue
        value = parsed.value() if not parsed.is_delete() else None
        if isinstance(value, (bool, int, float)) and _field_type(root_type, parsed.key_or_group) is str:
            key, _, text = override.partition("=")
            override = f"{key}='{text.strip()}'"
        kept.append(override)
    return kept


def _field_type(root_type: type, key: str) -> Any:
    """The schema's type of a dotted key (Optional unwrapped), or None when the schema has no such scalar key."""
    import types
    import typing

    kind: Any = root_type
    for name in key.split("."):
        if not dataclasses.is_dataclass(kind) or name not in {f.name for f in dataclasses.fields(kind)}:
            return None
        kind = typing.get_type_hints(kind)[name]
        if typing.get_origin(kind) in (typing.Union, types.UnionType):
            inner = [a for a in typing.get_args(kind) if a is not type(None)]
            kind = inner[0] if len(inner) == 1 else None
    return kind


def _refuse_added_keys(node: Any, root_type: type, prefix: str = "") -> None:
    """UserError for a key the schema does not have: `+train.max_step=3` adds one past Hydra's struct check, and
    OmegaConf.to_object would then drop it without a word."""
    from omegaconf import DictConfig

    schema = node._metadata.object_type
    if not dataclasses.is_dataclass(schema):  # a free-form mapping (dict-typed field): any key may be there
        return
    fields = {f.name for f in dataclasses.fields(schema)}
    for key in node.keys():
        if key not in fields:
            raise UserError(_unknown_key(f"{prefix}{key}", root_type))
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_none():
            _refuse_added_keys(child, root_type, f"{prefix}{key}.")


def _write_back_normalised(node: Any, typed: Any) -> None:
    """Copy the strings a schema's __post_init__ normalised (train.compile: 'True' -> 'true') back into the composed
    config, so the printed and saved YAML shows the values the run uses."""
    from omegaconf import DictConfig

    for f in dataclasses.fields(typed) if dataclasses.is_dataclass(typed) else ():
        if f.name not in node:
            continue
        value, child = getattr(typed, f.name), node[f.name]
        if isinstance(child, DictConfig):
            _write_back_normalised(child, value)
        elif isinstance(value, str) and isinstance(child, str) and value != child:
            node[f.name] = value


def _recipe_override(recipe: str, recipes_dir: Path, scratch: Path) -> tuple[str, str]:
    """Map a recipe name (`tiny/pretrain`) or YAML path to the Hydra group and option to add."""
    path = Path(recipe)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        (scratch / "user").mkdir()
        (scratch / "user" / "recipe.yaml").write_text(_checked_recipe_text(path))
        return "user", "recipe"
    if path.suffix in (".yaml", ".yml"):
        raise UserError(f"recipe file {recipe} does not exist")
    name = recipe.strip("/")
    if "/" not in name or not (recipes_dir / f"{name}.yaml").is_file():
        known = list_recipes()
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.4)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise UserError(f"unknown recipe {recipe!r}; {hint}shipped recipes: {', '.join(known)} (or give a .yaml path)")
    group, option = name.rsplit("/", 1)
    return group, option


def _refuse_other_commands_recipe(command: str, name: str | None) -> None:
    """A shipped recipe is written for one command (its `# llmkit <command>` line): say so when used with another."""
    written_for = recipe_command(name) if name else None
    if written_for not in (None, command):
        mine = [r for r in list_recipes() if recipe_command(r) == command]
        raise UserError(f"{name} is a recipe for `llmkit {written_for}`, not `llmkit {command}`: run `llmkit "
                        f"{written_for} {name}`, or use one of {command}'s: {', '.join(mine) or 'none'}")


def _checked_recipe_text(path: Path) -> str:
    """A user's recipe file, checked to be a YAML mapping; `# @package _global_` is added when it has no package
    line, so that `train: {max_steps: 3}` sets train.max_steps as in the shipped recipes."""
    import yaml

    try:
        text = path.read_text(encoding="utf-8-sig")
        content = yaml.safe_load(text)
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"recipe file {path} cannot be read: {error}") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {min(mark.line + 1, len(text.splitlines()))}" if mark else ""  # (end of file: its last line)
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise UserError(f"recipe file {path}{where}: not valid YAML ({problem})") from None
    if content is not None and not isinstance(content, dict):
        raise UserError(f"recipe file {path} must be a mapping of config keys (train:, model:, ...), "
                        f"not a {type(content).__name__}")
    if not any(line.lstrip("# ").startswith("@package") for line in text.splitlines() if line.startswith("#")):
        text = "# @package _global_\n" + text
    return text


def schema_keys(root: type, prefix: str = "") -> list[str]:
    """Every dotted key of a schema dataclass (for suggestions and the surface test)."""
    import typing

    keys: list[str] = []
    hints = typing.get_type_hints(root)
    for f in dataclasses.fields(root):
        key = f"{prefix}{f.name}"
        kind = hints[f.name]
        inner = [a for a in typing.get_args(kind) if dataclasses.is_dataclass(a)]
        if dataclasses.is_dataclass(kind) or inner:
            keys.extend(schema_keys(kind if dataclasses.is_dataclass(kind) else inner[0], key + "."))
        else:
            keys.append(key)
    return keys


def _unknown_key(key: str, root_type: type, where: str = "") -> str:
    if key.split(".")[0] == "launcher" and "launcher" not in {f.name for f in dataclasses.fields(root_type)}:
        from llmkit.config.schema import ROOTS

        command = next((name for name, root in ROOTS.items() if root is root_type), "this command")
        several = ", ".join(name for name, root in ROOTS.items() if any(f.name == "launcher" for f in
                                                                           dataclasses.fields(root)))
        return (f"unknown config key '{key}'{where}: `llmkit {command}` runs in one process (launcher.num_processes "
                f"is for {several})")
    keys = schema_keys(root_type)
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.5)
    head, _, rest = key.partition(".")
    groups = sorted({k.split(".", 1)[0] for k in keys})
    if head not in groups:  # a misspelt group (modle.n_layer): suggest the group, with the rest of the key
        near = difflib.get_close_matches(head, groups, n=1, cutoff=0.6)
        close = [f"{near[0]}.{rest}" if rest else near[0]] if near else close
    siblings = [k for k in keys if k.rsplit(".", 1)[0] == key.rsplit(".", 1)[0] and "." in key]
    hint = f"did you mean {', '.join(close)}?" if close else f"valid keys: {', '.join(siblings or keys[:30])}"
    return f"unknown config key '{key}'{where}; {hint}"


def _bad_value(key: str, reason: str, where: str = "") -> str:
    if "is not a ListConfig" in reason:
        return f"bad value for '{key}'{where}: it takes a list, e.g. [first, second] (one item: [item])"
    return f"bad value for '{key}'{where}: {reason}"


def _explain(error: Exception, root_type: type, recipe: str | None = None) -> str:
    """One clear line for a Hydra/OmegaConf composition failure."""
    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

    cause = error.__cause__ or error
    key = getattr(cause, "full_key", None)
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and key:
        return _unknown_key(key, root_type)
    if isinstance(cause, ValidationError) and key:
        first = str(cause.msg if hasattr(cause, "msg") else cause).splitlines()[0]
        return _bad_value(key, first)
    text = str(error)
    if "full_key:" in text:  # a failure inside a config file (a recipe, a conf/ group), which Hydra names first
        lines = [line.strip() for line in text.splitlines()]
        key = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("full_key:"))
        source = text.split("'", 2)[1] if text.startswith("In '") else None
        reason = next((line for line in lines[1 if source else 0:] if line and not line.startswith(
            ("full_key", "object_type", "reference_type"))), "")
        where = "" if source is None else f" in {recipe}" if source in ("user/recipe", recipe) else f" in {source}.yaml"
        if "ConfigKeyError" in text:
            return _unknown_key(key, root_type, where)
        return _bad_value(key, reason, where)
    if isinstance(error, MissingConfigException):
        text = str(error)
        missing = text.split("Could not find '", 1)[-1].split("'", 1)[0]
        options = getattr(error, "options", None) or []
        group = missing.split("/", 1)[0]
        return f"unknown choice '{missing.replace('/', '=', 1)}'; available {group} options: {', '.join(options) or 'none'}"
    if isinstance(error, OverrideParseException):
        override = getattr(error, "override", None)
        which = f" {override!r}" if override else ""
        value = str(override or "").partition("=")[2]
        mark = '"' if "'" in value else "'"
        quote = (f"; quote a value with special characters: {str(override).partition('=')[0]}={mark}{value}{mark}"
                 if value and not value.startswith(("'", '"', "[", "{")) else "")
        return f"could not parse the override{which}: {str(error).splitlines()[0]} (use key=value or +key=value{quote})"
    return str(error).splitlines()[0] if str(error) else type(error).__name__
