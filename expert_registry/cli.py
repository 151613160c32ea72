"""``coe-registry``: add, change, list and export experts and the category map.

Every command takes ``--redis-url`` (env ``COE_REDIS_URL``; default: the embedded Redis) and
``--namespace`` (env ``COE_NAMESPACE``; default ``default``). Bad input prints ONE line
``error: ...`` on stderr, exits with code 2, and changes nothing.
"""

from __future__ import annotations

import contextlib
import json
import re
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Optional

import click
import typer
import yaml
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from expert_registry import embedded
from expert_registry.errors import InvalidExpert, RegistryError
from expert_registry.list_view import fmt_bytes as _fmt_bytes
from expert_registry.model_files import ModelInfo, inspect_model
from expert_registry.spec import parse_category_map, parse_expert, validate_name
from expert_registry.store import EXPORT_FORMAT, RedisRegistry

EXIT_BAD_INPUT = 2


def _click_exc(name: str) -> tuple[type[BaseException], ...]:
    """The exception class ``name`` of click and of the click copy vendored by newer typer."""
    mods = [click.exceptions]
    with contextlib.suppress(ImportError):
        from typer._click import exceptions as vendored  # typer >= 0.2x ships its own click

        mods.append(vendored)
    return tuple(getattr(m, name) for m in mods if hasattr(m, name))


_NO_ARGS, _CLICK_ERR, _ABORT = _click_exc("NoArgsIsHelpError"), _click_exc("ClickException"), _click_exc("Abort")


class _OneLineErrors(TyperGroup):
    """Print usage errors (unknown option, bad value) as one ``error:`` line, exit 2."""

    def main(self, args: Any = None, prog_name: Any = None, complete_var: Any = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _NO_ARGS as e:  # bare `coe-registry`: show help
            ctx = getattr(e, "ctx", None)
            text = ctx.get_help() if ctx else ""  # typer's rich help prints itself, returns ""
            if text:
                click.echo(text, err=True)
            rv = EXIT_BAD_INPUT
        except _CLICK_ERR as e:
            click.echo(f"error: {' '.join(e.format_message().split())}", err=True)
            rv = e.exit_code
        except _ABORT:
            click.echo("error: aborted", err=True)
            rv = 1
        if standalone_mode:
            sys.exit(rv or 0)
        return rv


app = typer.Typer(cls=_OneLineErrors, name="coe-registry", no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False,
                  help="Manage coe's expert registry (experts + category map, stored in Redis).")
map_app = typer.Typer(no_args_is_help=True, help="Show or set the category map (category -> experts).")
server_app = typer.Typer(no_args_is_help=True, help="The embedded Redis (used when no --redis-url).")
app.add_typer(map_app, name="map")
app.add_typer(server_app, name="server")

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

RedisUrl = Annotated[Optional[str], typer.Option(
    "--redis-url", envvar="COE_REDIS_URL", show_envvar=True,
    help="Redis URL (redis://, rediss://, unix://). Default: the embedded Redis under $COE_HOME.")]
Namespace = Annotated[str, typer.Option(
    "--namespace", "-n", envvar="COE_NAMESPACE", show_envvar=True,
    help="Registry namespace, so several deployments can share one Redis.")]
JsonOut = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
ServiceUrl = Annotated[Optional[str], typer.Option(
    "--service", envvar="COE_URL", show_envvar=True,
    help="The coe service to ask for each expert's live status (loading and its phase, ready, failed). "
         "Default: http://127.0.0.1:8000.")]


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    """RegistryError (and bad files) -> one line on stderr, exit code 2."""
    try:
        yield
    except RegistryError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(EXIT_BAD_INPUT) from None


def _open(redis_url: str | None, namespace: str) -> RedisRegistry:
    """The registry; without a URL, the embedded Redis, and a note on stderr when this command had
    to start it (it keeps running for the next command and for `coe serve`)."""
    was_running = redis_url or embedded.embedded_status() is not None
    url = embedded.resolve_redis_url(redis_url)
    if not was_running:
        typer.echo(f"note: started the embedded Redis ({embedded.mask_url(url)}); it keeps running for later commands and "
                   "`coe serve`. Stop it with: coe-registry server stop", err=True)
    reg = RedisRegistry(url, namespace)
    reg.ping()
    return reg


def _known_categories(reg: RedisRegistry) -> tuple[list[str], str, str | None]:
    """The category names this namespace can route (decision 6): the set the serving router
    published, else the default taxonomy. Returns (names, where from, a warning or None)."""
    published = reg.categories()
    if published is not None:
        return published.categories, f"known to the router the service loaded ({published.source})", None
    from routers.router import DEFAULT_CATEGORIES  # the router's own list, not a copy

    return list(DEFAULT_CATEGORIES), "known to the default taxonomy", (
        f"warning: no coe service has published its router's categories in namespace '{reg.namespace}' yet; "
        "checked against the default taxonomy")


def _check_categories(reg: RedisRegistry, names: Any, what: str) -> str | None:
    """Refuse category names the router cannot route: a typo (``code`` for ``coding``) would
    otherwise be accepted and then answer 404 on every request. Returns the warning to print
    after the command succeeded (the default taxonomy was used), if any."""
    names = sorted(set(names))
    if not names:
        return None
    known, where, warning = _known_categories(reg)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise InvalidExpert(
            f"{what}: unknown categor{'y' if len(unknown) == 1 else 'ies'} {', '.join(map(repr, unknown))}; "
            f"{where}: {', '.join(known)}. A new category needs a router trained on your own "
            "prompts: `coe router train --data prompts.jsonl --out DIR`, then serve with router.path: DIR "
            "(docs/router.md)")
    return warning


def _warn(warning: str | None) -> None:
    if warning:
        typer.echo(warning, err=True)


def _load_yaml(path: Path, what: str) -> Any:
    """The file's YAML as plain data, or one line saying why not. Nesting deeper than a spec ever
    needs, and an alias that refers to itself, are refused here (they raised RecursionError with a
    traceback further down; issue 24)."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        _check_shape(data, path)
        return data
    except OSError as e:
        raise InvalidExpert(f"cannot read {what} file {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise InvalidExpert(f"{path}: not valid YAML: {e}") from None
    except RecursionError:
        raise InvalidExpert(f"{path}: nested too deeply to be an expert file") from None


MAX_YAML_DEPTH = 32  # an export is 5 levels deep; a spec's own fields add a few


def _check_shape(data: Any, path: Path) -> None:
    """Refuse a YAML value that contains itself (a recursive alias) or nests past MAX_YAML_DEPTH."""
    stack: list[tuple[Any, int, tuple[int, ...]]] = [(data, 0, ())]
    while stack:
        node, depth, above = stack.pop()
        if not isinstance(node, (dict, list)):
            continue
        if id(node) in above:
            raise InvalidExpert(f"{path}: a YAML alias refers to a value that contains it (a recursive alias)")
        if depth >= MAX_YAML_DEPTH:
            raise InvalidExpert(f"{path}: nested deeper than {MAX_YAML_DEPTH} levels: not an expert file")
        children = node.values() if isinstance(node, dict) else node
        stack.extend((c, depth + 1, (*above, id(node))) for c in children)


def _parse_capabilities(items: list[str]) -> dict[str, float]:
    caps: dict[str, float] = {}
    for item in items:
        cat, sep, score = item.partition("=")
        try:
            if not sep or not cat.strip():
                raise ValueError
            caps[cat.strip()] = float(score)
        except ValueError:
            raise InvalidExpert(f"--capability {item!r}: expected CATEGORY=SCORE, e.g. coding=0.8") from None
    return caps


def _describe(info: ModelInfo, expert: Any) -> str:
    """What the files say, with the values the registry stores (an explicit --max-context wins)."""
    bits = [info.format, _fmt_bytes(expert.size_bytes)]
    if info.architecture:
        bits.append(info.architecture)
    if info.params_estimate:
        bits.append(f"{info.params_estimate / 1e6:.0f}M params")
    bits.append(f"ctx {expert.max_context}")
    return ", ".join(bits)


def _options_dict(**opts: Any) -> dict[str, Any]:
    """CLI options -> spec fields; only the options the user gave."""
    data: dict[str, Any] = {}
    gen = {k: opts.pop(k) for k in ("max_tokens", "temperature", "top_p", "stop")}
    caps = opts.pop("capability")
    tags = opts.pop("tag")
    settings = opts.pop("engine_settings", None)
    template_file = opts.pop("chat_template_file")
    for key, value in opts.items():
        if value is not None:
            data[key] = value
    if template_file is not None:
        try:
            data["chat_template"] = template_file.read_text(encoding="utf-8")
        except OSError as e:
            raise InvalidExpert(f"cannot read chat template file {template_file}: {e.strerror or e}") from None
    gen = {k: v for k, v in gen.items() if v not in (None, [])}
    if gen:
        data["generation"] = gen
    if caps:
        data["capabilities"] = _parse_capabilities(caps)
    if tags:
        data["tags"] = list(tags)
    if settings:
        data["engine_settings"] = settings
    return data


_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1 << 10, "m": 1000**2, "mb": 1000**2, "mib": 1 << 20,
          "g": 1000**3, "gb": 1000**3, "gib": 1 << 30, "t": 1000**4, "tb": 1000**4, "tib": 1 << 40}


def parse_bytes(text: str, what: str = "--kv-cache") -> int:
    """``"4GiB"`` / ``"512 MiB"`` / ``"1e9"`` -> bytes, or a one-line :class:`InvalidExpert`."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", text or "")
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _UNITS:
        raise InvalidExpert(f"{what}: {text!r} is not a size; use bytes or a unit, e.g. 4GiB, 512MiB, 8GB")
    return int(float(m.group(1)) * _UNITS[unit])


def _engine_settings(kv_cache: str | None, gpu_memory_utilization: float | None, eager: bool | None,
                     quantization: str | None, max_num_seqs: int | None, load_format: str | None,
                     tool_call_parser: str | None = None) -> dict[str, Any]:
    """The engine options the user gave, as ``engine_settings`` fields (validated with the spec)."""
    raw = {"kv_cache_bytes": parse_bytes(kv_cache) if kv_cache is not None else None,
           "gpu_memory_utilization": gpu_memory_utilization, "enforce_eager": eager,
           "quantization": quantization, "max_num_seqs": max_num_seqs, "load_format": load_format,
           "tool_call_parser": tool_call_parser}
    return {k: v for k, v in raw.items() if v is not None}


def _with_model_info(data: dict[str, Any], explicit: set[str]) -> tuple[dict[str, Any], ModelInfo]:
    """Check the model is there and readable; record size (and params/context unless given)."""
    settings = data.get("engine_settings") or {}
    dummy = (settings.get("load_format") if isinstance(settings, dict) else getattr(settings, "load_format", None)) == "dummy"
    info = inspect_model(data["model"], data.get("gguf_file"), data.get("revision"), weights_required=not dummy)
    local = Path(str(data["model"])).expanduser()
    if local.exists():  # store an absolute path: the service runs from another directory
        data["model"] = str(local.resolve())
    data["size_bytes"] = info.size_bytes
    if "params_b" not in explicit and info.params_b is not None:
        data["params_b"] = info.params_b
    if "max_context" not in explicit and info.context_length:
        data["max_context"] = info.context_length
    return data, info


# Options shared by add and update (typer needs them spelled out per command).
_ModelOpt = Annotated[Optional[str], typer.Option("--model", "-m", help="Model folder, .gguf file, or hub id.")]
_GgufOpt = Annotated[Optional[str], typer.Option(help="GGUF file inside --model (folder or hub repo).")]
_RevOpt = Annotated[Optional[str], typer.Option(help="Hub revision (hub ids only).")]
_EngineOpt = Annotated[Optional[str], typer.Option(help="auto | hf | vllm")]
_DtypeOpt = Annotated[Optional[str], typer.Option(help="auto | float32 | bfloat16 | float16")]
_CtxOpt = Annotated[Optional[int], typer.Option(help="Max context tokens (default: from the model).")]
_TplOpt = Annotated[Optional[str], typer.Option(help="Chat template (Jinja) overriding the model's.")]
_TplFileOpt = Annotated[Optional[Path], typer.Option(help="Read --chat-template from a file.")]
_SysOpt = Annotated[Optional[str], typer.Option(help="System prompt added to every conversation.")]
_MaxTokOpt = Annotated[Optional[int], typer.Option(help="Default max_tokens.")]
_TempOpt = Annotated[Optional[float], typer.Option(help="Default temperature.")]
_TopPOpt = Annotated[Optional[float], typer.Option(help="Default top_p.")]
_StopOpt = Annotated[Optional[list[str]], typer.Option("--stop", help="Default stop string (repeatable).")]
_CapOpt = Annotated[Optional[list[str]], typer.Option(
    "--capability", "-c", help="CATEGORY=SCORE in [0,1] (repeatable), e.g. -c coding=0.8")]
_CostOpt = Annotated[Optional[float], typer.Option("--cost-per-1k-tokens", help="Relative cost per 1k tokens.")]
_ParamsOpt = Annotated[Optional[float], typer.Option(help="Parameters in billions (default: from the weights).")]
_TrustOpt = Annotated[Optional[bool], typer.Option(
    "--trust-remote-code/--no-trust-remote-code", help="Allow the model's own Python code (off by default).")]
_KvOpt = Annotated[Optional[str], typer.Option(
    "--kv-cache", help="KV cache per engine, bytes or with a unit: 4GiB, 512MiB (vLLM).")]
_GpuUtilOpt = Annotated[Optional[float], typer.Option(
    help="vLLM gpu_memory_utilization, used only without --kv-cache (0-1].")]
_EagerOpt = Annotated[Optional[bool], typer.Option(
    "--eager/--no-eager", help="vLLM without CUDA graphs (faster start, less HBM).")]
_QuantOpt = Annotated[Optional[str], typer.Option(help="awq | gptq | fp8 | bitsandbytes | compressed-tensors")]
_SeqsOpt = Annotated[Optional[int], typer.Option(help="Requests the engine batches at once.")]
_LoadFmtOpt = Annotated[Optional[str], typer.Option(help="auto | safetensors | dummy (random weights, real shapes)")]
_ToolParserOpt = Annotated[Optional[str], typer.Option(
    help="vLLM tool-call parser for tool_choice 'auto' (hermes, llama3_json, mistral, …; vLLM's names).")]
_TagOpt = Annotated[Optional[list[str]], typer.Option("--tag", help="Free-form tag (repeatable).")]
_FileOpt = Annotated[Optional[Path], typer.Option("--from-file", "-f", help="YAML spec; options override it.")]
_NoCheckOpt = Annotated[bool, typer.Option(
    "--skip-model-check", help="Do not look for the model here (it lives only on the serving machines).")]
_MapOpt = Annotated[bool, typer.Option(
    "--map", help="Also append it to the category map of each category it declares a capability > 0 in "
                  "(last, so the experts already there stay preferred): routed requests reach only the experts "
                  "the map lists. Without --map, add prints the `map set` command that does it.")]


def _follow_up_options(ctx: typer.Context, namespace: str) -> str:
    """The options a printed follow-up command needs to reach the same registry: ``-n`` outside the
    default namespace, ``--redis-url`` when it was typed (masked: a password is not echoed)."""
    bits = [f" -n {shlex.quote(namespace)}"] if namespace != "default" else []
    source = ctx.get_parameter_source("redis_url")
    if ctx.params.get("redis_url") and getattr(source, "name", "") == "COMMANDLINE":
        bits.append(f" --redis-url {shlex.quote(embedded.mask_url(ctx.params['redis_url']))}")
    return "".join(bits)


def _routing_plan(expert: Any, cmap: dict[str, list[str]], use_map: bool, follow: str) -> tuple[list[str], str | None]:
    """The categories ``--map`` appends the new expert to, and the note to print after ``add``.
    Stage 2 of the router takes as candidates only the experts the category map lists for the
    request's categories, so an expert that is in no map entry is never routed to, whatever it
    declares; only an empty map lets every expert compete on its capabilities (docs/registry.md)."""
    name = expert.name
    declared = [c for c, score in expert.capabilities.items() if score > 0]
    if not cmap:
        return [], (f"note: the category map is empty, so every expert competes on its capabilities and '{name}' "
                    "is routed to already; --map left the map empty (a map naming only it would take every "
                    "other expert out of the running)") if use_map else None
    if not declared:
        return [], (f"note: '{name}' declares no capability (-c CATEGORY=SCORE) and is in no category of the "
                    f"category map, so routed requests never reach it; requests that name it (model '{name}') do")
    if use_map:
        return declared, None
    cmd = "coe-registry map set " + " ".join(f"{c}={','.join([*cmap.get(c, []), name])}" for c in declared)
    return [], (f"note: '{name}' is not in the category map for {', '.join(declared)}, so requests routed to "
                f"{'that category' if len(declared) == 1 else 'those categories'} do not reach it: the router picks "
                "among the experts the map lists. Add it (after the experts already there) with:\n"
                f"  {cmd}{follow}\nor add experts with --map to do both in one step.")


def _spec_from(from_file: Path | None, opts: dict[str, Any]) -> dict[str, Any]:
    """The fields of a new expert: the --from-file spec refined by the options given."""
    data: dict[str, Any] = {}
    if from_file is not None:
        loaded = _load_yaml(from_file, "spec")
        if not isinstance(loaded, dict):
            raise InvalidExpert(f"{from_file}: expected a mapping of expert fields")
        data.update(loaded)
    for key in ("generation", "capabilities", "engine_settings"):  # options refine the file's dicts
        if key in opts and isinstance(data.get(key), dict):
            opts[key] = {**data[key], **opts[key]}
    if "tags" in opts and isinstance(data.get("tags"), list):
        opts["tags"] = list(dict.fromkeys([*data["tags"], *opts["tags"]]))
    data.update(opts)
    in_file = f" (or name: in {from_file})" if from_file else ""
    if not data.get("name"):
        raise InvalidExpert(f"NAME is required: coe-registry add NAME --model PATH{in_file}")
    validate_name(str(data["name"]))
    if not data.get("model"):
        raise InvalidExpert(f"--model is required: the model folder, .gguf file or hub id of expert "
                            f"'{data['name']}'" + (f" (or model: in {from_file})" if from_file else ""))
    return data


@app.command()
def add(
    ctx: typer.Context,
    name: Annotated[Optional[str], typer.Argument(help="Expert name: 1-64 chars of a-z 0-9 . _ -")] = None,
    model: _ModelOpt = None, gguf_file: _GgufOpt = None, revision: _RevOpt = None,
    engine: _EngineOpt = None, dtype: _DtypeOpt = None, max_context: _CtxOpt = None,
    chat_template: _TplOpt = None, chat_template_file: _TplFileOpt = None, system_prompt: _SysOpt = None,
    max_tokens: _MaxTokOpt = None, temperature: _TempOpt = None, top_p: _TopPOpt = None,
    stop: _StopOpt = None, capability: _CapOpt = None, cost_per_1k_tokens: _CostOpt = None,
    params_b: _ParamsOpt = None, trust_remote_code: _TrustOpt = None, tag: _TagOpt = None,
    kv_cache: _KvOpt = None, gpu_memory_utilization: _GpuUtilOpt = None, eager: _EagerOpt = None,
    quantization: _QuantOpt = None, max_num_seqs: _SeqsOpt = None, load_format: _LoadFmtOpt = None,
    tool_call_parser: _ToolParserOpt = None,
    from_file: _FileOpt = None, skip_model_check: _NoCheckOpt = False, map_: _MapOpt = False,
    redis_url: RedisUrl = None, namespace: Namespace = "default",
) -> None:
    """Register an expert after checking its model is there and readable (no weights loaded).
    Routed requests reach it once the category map lists it (--map, or the `map set` it prints)."""
    with _user_errors():
        opts = _options_dict(
            name=name, model=model, gguf_file=gguf_file, revision=revision, engine=engine, dtype=dtype,
            max_context=max_context, chat_template=chat_template, chat_template_file=chat_template_file,
            system_prompt=system_prompt, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
            stop=stop, capability=capability or [], cost_per_1k_tokens=cost_per_1k_tokens,
            params_b=params_b, trust_remote_code=trust_remote_code, tag=tag or [],
            engine_settings=_engine_settings(kv_cache, gpu_memory_utilization, eager, quantization, max_num_seqs,
                                             load_format, tool_call_parser))
        data = _spec_from(from_file, opts)
        source = f"expert {data['name']}" + (f" ({from_file})" if from_file else "")
        for key in ("size_bytes", "status", "status_reason", "created_at", "updated_at"):
            if key in data:
                raise InvalidExpert(f"{source}: field '{key}' is set by the registry, not by add")
        parse_expert(data, source)  # every field valid before we look at files or Redis
        explicit = set(data)
        info = None
        if not skip_model_check:
            data, info = _with_model_info(data, explicit)
        expert = parse_expert(data, source)
        _warn_remote_code(expert.name, expert.trust_remote_code)
        reg = _open(redis_url, namespace)
        warning = _check_categories(reg, expert.capabilities, f"expert {expert.name}")
        cmap = reg.get_map()
        to_map, note = _routing_plan(expert, cmap, map_, _follow_up_options(ctx, namespace))
        version = reg.add(expert, to_map=to_map)
    detail = _describe(info, expert) if info else "model not checked"
    out.print(f"added expert '{expert.name}' ({detail}); registry version {version}")
    if to_map:
        out.print("category map: " + "; ".join(f"{c} = {', '.join([*cmap.get(c, []), expert.name])}" for c in to_map))
    _warn(warning)
    _warn(note)


@app.command()
def update(
    name: Annotated[str, typer.Argument(help="Expert to change.")],
    model: _ModelOpt = None, gguf_file: _GgufOpt = None, revision: _RevOpt = None,
    engine: _EngineOpt = None, dtype: _DtypeOpt = None, max_context: _CtxOpt = None,
    chat_template: _TplOpt = None, chat_template_file: _TplFileOpt = None, system_prompt: _SysOpt = None,
    max_tokens: _MaxTokOpt = None, temperature: _TempOpt = None, top_p: _TopPOpt = None,
    stop: _StopOpt = None, capability: _CapOpt = None, cost_per_1k_tokens: _CostOpt = None,
    params_b: _ParamsOpt = None, trust_remote_code: _TrustOpt = None, tag: _TagOpt = None,
    kv_cache: _KvOpt = None, gpu_memory_utilization: _GpuUtilOpt = None, eager: _EagerOpt = None,
    quantization: _QuantOpt = None, max_num_seqs: _SeqsOpt = None, load_format: _LoadFmtOpt = None,
    tool_call_parser: _ToolParserOpt = None,
    status: Annotated[Optional[str], typer.Option(help="ready | failed")] = None,
    status_reason: Annotated[Optional[str], typer.Option(help="Why it failed.")] = None,
    from_file: _FileOpt = None, skip_model_check: _NoCheckOpt = False,
    redis_url: RedisUrl = None, namespace: Namespace = "default",
) -> None:
    """Change fields of an expert. Only the given options change; -c merges into capabilities
    (-c coding=0 keeps the category with score 0). A new --model is checked like in add."""
    with _user_errors():
        validate_name(name)
        data: dict[str, Any] = {}
        if from_file is not None:
            loaded = _load_yaml(from_file, "spec")
            if not isinstance(loaded, dict):
                raise InvalidExpert(f"{from_file}: expected a mapping of expert fields")
            if loaded.pop("name", name) != name:
                raise InvalidExpert(f"{from_file}: names another expert; experts cannot be renamed")
            data.update(loaded)
        data.update(_options_dict(
            model=model, gguf_file=gguf_file, revision=revision, engine=engine, dtype=dtype,
            max_context=max_context, chat_template=chat_template, chat_template_file=chat_template_file,
            system_prompt=system_prompt, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
            stop=stop, capability=capability or [], cost_per_1k_tokens=cost_per_1k_tokens,
            params_b=params_b, trust_remote_code=trust_remote_code, tag=tag or [],
            engine_settings=_engine_settings(kv_cache, gpu_memory_utilization, eager, quantization, max_num_seqs,
                                             load_format, tool_call_parser),
            status=status, status_reason=status_reason))
        if not data:
            raise InvalidExpert("nothing to update: give at least one option (see --help)")
        reg = _open(redis_url, namespace)
        warning = _check_categories(reg, (data.get("capabilities") or {}), f"expert {name}")
        current = reg.get(name)
        # validate the merged result before touching files (unknown fields, ranges)
        parse_expert({**current.model_dump(), **{k: v for k, v in data.items()
                                                 if k not in ("generation", "capabilities", "engine_settings")},
                      "engine_settings": {**current.engine_settings.model_dump(), **data.get("engine_settings", {})}},
                     f"expert {name}")
        info = None
        if not skip_model_check and {"model", "gguf_file", "revision"} & data.keys():
            merged = {"model": current.model, "gguf_file": current.gguf_file,
                      "revision": current.revision, **data}
            merged, info = _with_model_info(merged, set(data))
            data = {**data, **{k: merged[k] for k in ("model", "size_bytes", "params_b", "max_context")
                               if k in merged}}
        _warn_remote_code(name, bool(data.get("trust_remote_code")))
        version = reg.update(name, **data)
        stored = reg.get(name) if info else None
    out.print(f"updated expert '{name}'" + (f" ({_describe(info, stored)})" if info else "")
              + f"; registry version {version}")
    _warn(warning)


@app.command()
def remove(
    name: Annotated[str, typer.Argument(help="Expert to remove.")],
    force: Annotated[bool, typer.Option("--force", help="Also remove it from the category map.")] = False,
    redis_url: RedisUrl = None, namespace: Namespace = "default",
) -> None:
    """Unregister an expert (refused while the category map names it, unless --force)."""
    with _user_errors():
        validate_name(name)
        reg = _open(redis_url, namespace)
        version = reg.remove(name, force=force)
    out.print(f"removed expert '{name}'; registry version {version}")


def _warn_remote_code(name: str, asked: bool) -> None:
    """An entry that asks to run its model folder's Python is a code-execution grant: say so."""
    if asked:
        err.print(f"[bold yellow]warning:[/] expert '{name}' asks for trust_remote_code: the Python files in its "
                  "model folder would run inside the serving process. coe refuses to load it unless the service "
                  "opts in (security.allow_remote_code: true in the serve config).")


@app.command("list")
def list_(json_out: JsonOut = False,
          long: Annotated[bool, typer.Option("--long", "-l", help="Also engine, model and tags.")] = False,
          wide: Annotated[bool, typer.Option(
              "--wide", "-w", help="Like -l, with each model's full path; nothing is cut to fit.")] = False,
          redis_url: RedisUrl = None, namespace: Namespace = "default", service: ServiceUrl = None) -> None:
    """List the experts of the namespace (fits 80 columns; -l adds engine, model and tags, --wide the
    full model paths, `show` every field); stored entries that cannot be read are skipped, with a
    warning each. The status column is the running service's (`loading: <phase>` while an added
    expert's engine starts, then `ready`), asked over HTTP; without a service it is the stored one,
    and the table says so."""
    from expert_registry.list_view import long_listing, short_table
    from expert_registry.live import live_view

    with _user_errors():
        snap = _open(redis_url, namespace).snapshot()
    live = live_view(service)
    for bad, why in snap.invalid.items():  # skipped, never fatal; shown so that someone fixes them
        err.print(f"[bold yellow]warning:[/] skipped unreadable entry '{bad}': {why}")
    if json_out:
        typer.echo(json.dumps([dict(e.model_dump(mode="json"), service_status=live.status(e.name),
                                    service_phase=(live.experts.get(e.name) or {}).get("phase"))
                               for e in snap.experts.values()], indent=2))
    elif long or wide:  # laid out to the terminal's width (COLUMNS, else the terminal, else 80)
        out.print(long_listing(snap, namespace, live, out.width, wide), soft_wrap=True)
    else:
        out.print(short_table(snap, namespace, live), soft_wrap=False)  # the table fits the terminal


@app.command()
def show(name: Annotated[str, typer.Argument()], json_out: JsonOut = False,
         redis_url: RedisUrl = None, namespace: Namespace = "default") -> None:
    """Show every field of one expert."""
    with _user_errors():
        validate_name(name)
        expert = _open(redis_url, namespace).get(name)
    data = expert.model_dump(mode="json")
    if json_out:
        typer.echo(json.dumps(data, indent=2))
    else:
        typer.echo(yaml.safe_dump(data, sort_keys=False, allow_unicode=True).rstrip())


@map_app.command("show")
def map_show(json_out: JsonOut = False, redis_url: RedisUrl = None, namespace: Namespace = "default") -> None:
    """Show the category map (category -> experts, in preference order)."""
    with _user_errors():
        cmap = _open(redis_url, namespace).get_map()
    if json_out:
        typer.echo(json.dumps(cmap, indent=2))
        return
    table = Table(title=f"category map of namespace '{namespace}'")
    table.add_column("category")
    table.add_column("experts (preferred first)")
    for cat, names in cmap.items():
        table.add_row(cat, ", ".join(names))
    out.print(table if cmap else "category map is empty")


@map_app.command("set")
def map_set(
    assignments: Annotated[Optional[list[str]], typer.Argument(
        help="CATEGORY=EXPERT[,EXPERT...]; an empty list (CATEGORY=) removes the category.")] = None,
    from_file: Annotated[Optional[Path], typer.Option(
        "--from-file", "-f", help="YAML map (category: [experts]) replacing the whole map.")] = None,
    replace: Annotated[bool, typer.Option(
        "--replace", help="Replace the whole map instead of changing only the given categories.")] = False,
    redis_url: RedisUrl = None, namespace: Namespace = "default",
) -> None:
    """Set categories of the map. Every named expert must exist."""
    with _user_errors():
        changes: dict[str, list[str]] = {}
        for item in assignments or []:
            cat, sep, names = item.partition("=")
            if not sep or not cat.strip():
                raise InvalidExpert(f"map assignment {item!r}: expected CATEGORY=EXPERT[,EXPERT...]")
            changes[cat.strip()] = [n.strip() for n in names.split(",") if n.strip()]
        base: dict[str, Any] | None = None
        if from_file is not None:
            loaded = _load_yaml(from_file, "map")
            if isinstance(loaded, dict) and "category_map" in loaded:  # an export file
                loaded = loaded["category_map"]
            base = dict(parse_category_map(loaded, str(from_file)))
        elif replace:
            base = {}
        if base is None and not changes:
            raise InvalidExpert("nothing to set: give CATEGORY=EXPERTS arguments, --from-file or --replace")
        parse_category_map({c: n for c, n in changes.items()})
        reg = _open(redis_url, namespace)
        warning = _check_categories(reg, [c for c, n in {**(base or {}), **changes}.items() if n], "category map")
        if base is None:
            version = reg.update_map(changes)
        else:
            base.update(changes)
            version = reg.set_map({c: n for c, n in base.items() if n})
    out.print(f"category map set; registry version {version}")
    _warn(warning)


@app.command("export")
def export_(
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="File to write (default: stdout).")] = None,
    redis_url: RedisUrl = None, namespace: Namespace = "default",
) -> None:
    """Write experts + category map as YAML (what `import` reads)."""
    with _user_errors():
        data = _open(redis_url, namespace).export()
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    if output is None:
        typer.echo(text, nl=False)
    else:
        output.write_text(text, encoding="utf-8")
        out.print(f"exported {len(data['experts'])} experts to {output}")


@app.command("import")
def import_(
    file: Annotated[Path, typer.Argument(help="YAML from `coe-registry export` (or a list of expert specs).")],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace experts that already exist.")] = False,
    redis_url: RedisUrl = None, namespace: Namespace = "default",
) -> None:
    """Add all experts (and the map) of a file in one transaction: all or nothing."""
    with _user_errors():
        data = _load_yaml(file, "import")
        cmap = None
        if isinstance(data, list):
            experts = data
        elif isinstance(data, dict):
            unknown = sorted(set(data) - {"format", "namespace", "version", "experts", "category_map"})
            if unknown:
                raise InvalidExpert(f"{file}: unknown top-level field(s): {', '.join(unknown)}")
            if data.get("format", EXPORT_FORMAT) != EXPORT_FORMAT:
                raise InvalidExpert(f"{file}: unsupported export format {data.get('format')!r}")
            experts = data.get("experts") or []
            cmap = data.get("category_map")
            if not isinstance(experts, list):
                raise InvalidExpert(f"{file}: 'experts' must be a list")
        else:
            raise InvalidExpert(f"{file}: expected an export mapping or a list of experts")
        reg = _open(redis_url, namespace)
        cats = [c for e in experts if isinstance(e, dict) for c in (e.get("capabilities") or {})]
        warning = _check_categories(reg, [*cats, *(cmap or {})], str(file))
        version = reg.import_experts(experts, cmap, overwrite=overwrite)
    out.print(f"imported {len(experts)} experts{' and the category map' if cmap else ''}; "
              f"registry version {version}")
    _warn(warning)


@server_app.command("status")
def server_status(json_out: JsonOut = False) -> None:
    """Is the embedded Redis of this COE_HOME running? Where?"""
    info = embedded.embedded_status()
    if json_out:
        typer.echo(json.dumps(info.__dict__ if info else None, indent=2))
    elif info:
        out.print(f"embedded Redis running: {info.url} (pid {info.pid}, data {info.data_dir})")
    else:
        out.print(f"embedded Redis not running (data dir {embedded.embedded_data_dir()})")


@server_app.command("start")
def server_start() -> None:
    """Start (or find) the embedded Redis and print its URL."""
    with _user_errors():
        info = embedded.ensure_embedded()
    out.print(info.url)


@server_app.command("stop")
def server_stop() -> None:
    """Stop the embedded Redis of this COE_HOME (its data stays on disk)."""
    with _user_errors():
        stopped = embedded.stop_embedded()
    out.print("embedded Redis stopped" if stopped else "embedded Redis was not running")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
