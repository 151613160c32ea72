"""The README's Numbers table cannot drift from the recorded runs (issue 31 item 7).

The table's columns are ``what | measured | target | machine, date | source``. The source cell names
one or more JSON files under ``bench/results/`` (a backtick span ending in ``.json``), each followed by
the keys of the figures it backs (one backtick span per figure, in the order the figures appear in
*measured*). A key is a dotted path (``results.shipped.p50_ms``; a number indexes a list; ``*``
matches any key of one level) or a small expression over paths: ``+ - * /`` with spaces around them,
numbers, and ``min(...)``, ``max(...)``, ``abs(...)``, ``len(...)``. Derived figures (ratios, ms from
seconds, percentages) are therefore computed here from the JSON, never copied. A key whose value is
a boolean backs a word (``equal``), must be true and takes no number.

Every number in *measured* (outside backticks and link targets) must equal its key's value rounded
to the decimals the README shows. The *machine, date* cell must name exactly the CPU/GPU models the
JSON records (``cpu``/``gpu`` keys), the core count where a CPU run records one, and a date the JSON
records.
"""

from __future__ import annotations

import ast
import fnmatch
import json
import operator
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
COLUMNS = ["what", "measured", "target", "machine, date", "source"]

# Names a row may give a machine, and the words the recorded string must contain for each.
KNOWN_MACHINES = {
    "AMD EPYC": ("AMD", "EPYC"),
    "Intel Xeon": ("Intel", "Xeon"),
    "H100": ("H100",),
    "H200": ("H200",),
}
ARCHITECTURES = {"x86_64", "aarch64", "arm64", "amd64"}  # a `cpu` value that names no model
CORE_KEYS = {"cpus", "cores", "cpus_visible"}
DATE_KEYS = {"date", "date_utc"}
GPU_MODELS = {"H100", "H200"}

# A number not glued to a word (p50, 5xx, 8B, gpt-4o), with its sign and thousands commas.
FIGURE = re.compile(
    r"(?<![\w.,\-−])(?P<sign>[+−]|-(?=\d))?"
    r"(?P<num>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?)(?!\w)"
)
NUMBER = re.compile(r"\d+(?:\.\d+)?(?:e[+-]?\d+)?")
OPERAND = re.compile(r"[^\s(),]+")
FUNCTIONS = {"min", "max", "abs", "len"}
OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


# --- reading the table ------------------------------------------------------------------------


def numbers_section(text: str) -> str:
    start = text.index("\n## Numbers\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def split_cells(line: str) -> list[str]:
    cells = re.split(r"(?<!\\)\|", line.strip())
    return [c.strip() for c in cells[1:-1]]


def table_rows(section: str) -> tuple[list[str], list[list[str]]]:
    lines = [ln for ln in section.splitlines() if ln.startswith("|")]
    header = split_cells(lines[0])
    return header, [split_cells(ln) for ln in lines[2:]]


def figures(measured: str) -> list[str]:
    """Every number a reader sees in the cell, as written (code spans and link targets excluded)."""
    text = re.sub(r"`[^`]*`", " ", measured)
    text = re.sub(r"\]\([^)]*\)", "]", text)
    return [m.group(0) for m in FIGURE.finditer(text)]


def figure_value(figure: str) -> tuple[float, int]:
    """The number and how many decimals the README shows."""
    plain = figure.replace(",", "").replace("−", "-").lstrip("+")
    decimals = len(plain.split(".")[1]) if "." in plain else 0
    return float(plain), decimals


def sources(cell: str) -> list[tuple[str, list[str]]]:
    """[(json path, [key, ...]), ...] in the order the cell names them."""
    out: list[tuple[str, list[str]]] = []
    for span in re.findall(r"`([^`]+)`", cell):
        if span.endswith(".json") and " " not in span:
            out.append((span, []))
        else:
            assert out, f"key `{span}` comes before any JSON file in: {cell}"
            out[-1][1].append(span)
    return out


# --- reading the JSON -------------------------------------------------------------------------


def lookup(data, path: str):
    """A dotted path; a segment with * matches every key of its level and makes the result a list."""
    return _lookup(data, path.split("."), path)


def _lookup(node, parts: list[str], path: str):
    if not parts:
        return node
    head, rest = parts[0], parts[1:]
    if isinstance(node, list):
        assert head.isdigit(), f"{path}: {head!r} indexes a list"
        return _lookup(node[int(head)], rest, path)
    assert isinstance(node, dict), f"{path}: {head!r} goes below a value"
    if "*" in head or "?" in head:
        found = []
        for key in sorted(k for k in node if fnmatch.fnmatchcase(k, head)):
            value = _lookup(node[key], rest, path)
            found.extend(value if isinstance(value, list) else [value])
        assert found, f"{path}: nothing matches {head!r}"
        return found
    for n in range(len(parts), 0, -1):  # a key may itself contain dots
        key = ".".join(parts[:n])
        if key in node:
            return _lookup(node[key], parts[n:], path)
    raise KeyError(f"{path}: no key {head!r} (there: {', '.join(list(node)[:12])})")


def evaluate(expr: str, data):
    names: dict[str, object] = {}

    def operand(m: re.Match) -> str:
        tok = m.group(0)
        if tok in {"+", "-", "*", "/"} or NUMBER.fullmatch(tok):
            return tok
        if tok in FUNCTIONS and expr[m.end() : m.end() + 1] == "(":
            return tok
        name = f"_v{len(names)}"
        names[name] = lookup(data, tok)
        return name

    tree = ast.parse(OPERAND.sub(operand, expr), mode="eval")
    return _eval(tree.body, names)


def _flat(values) -> list:
    out = []
    for v in values:
        out.extend(v if isinstance(v, list) else [v])
    return out


def _eval(node, names):
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
        return node.value
    if isinstance(node, ast.Name) and node.id in names:
        return names[node.id]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_eval(node.operand, names)
    if isinstance(node, ast.BinOp) and type(node.op) in OPERATORS:
        return OPERATORS[type(node.op)](_eval(node.left, names), _eval(node.right, names))
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in FUNCTIONS:
        args = [_eval(a, names) for a in node.args]
        fn = node.func.id
        if fn == "abs":
            (arg,) = args
            return [abs(v) for v in arg] if isinstance(arg, list) else abs(arg)
        if fn == "len":
            return len(_flat(args))
        return (min if fn == "min" else max)(_flat(args))
    raise ValueError(f"not allowed in a README key: {ast.dump(node)}")


def walk(data, prefix=""):
    if isinstance(data, dict):
        for k, v in data.items():
            yield from walk(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            yield from walk(v, f"{prefix}.{i}")
    else:
        yield prefix, data


def recorded(data) -> tuple[set[str], set[int], set[str]]:
    """(machine names, core counts, dates) that a JSON records anywhere."""
    machines, cores, dates = set(), set(), set()
    for path, value in walk(data):
        key = path.rsplit(".", 1)[-1]
        if key in ("cpu", "gpu") and isinstance(value, str) and value not in ARCHITECTURES:
            words = value.replace("(R)", " ").replace("(TM)", " ").split()
            names = {n for n, need in KNOWN_MACHINES.items() if all(w in words for w in need)}
            assert names, f"{path} = {value!r} names no machine the README knows: add it to KNOWN_MACHINES"
            machines |= names
        elif key in CORE_KEYS and isinstance(value, int):
            cores.add(value)
        elif key in DATE_KEYS and isinstance(value, str) and re.match(r"\d{4}-\d{2}-\d{2}", value):
            dates.add(value[:10])
    return machines, cores, dates


def load(rel: str):
    path = REPO / rel
    assert path.is_file(), f"the README cites {rel}, which does not exist"
    return json.loads(path.read_text())


# --- the checks -------------------------------------------------------------------------------


def check_figures(row: dict[str, str]) -> list[str]:
    """Every mismatch between the row's measured figures and its JSON keys (empty when none)."""
    shown = figures(row["measured"])
    values: list[tuple[str, str, float]] = []
    problems = []
    for rel, keys in sources(row["source"]):
        data = load(rel)
        for key in keys:
            value = evaluate(key, data)
            if isinstance(value, bool):
                if not value:
                    problems.append(f"`{rel}` `{key}` is false, yet the README states it")
                continue
            assert isinstance(value, (int, float)), f"`{rel}` `{key}` is {value!r}, not a number"
            values.append((rel, key, float(value)))
    if len(shown) != len(values):
        return problems + [
            f"{len(shown)} figures {shown} but {len(values)} numeric keys {[k for _, k, _ in values]}"
        ]
    for fig, (rel, key, value) in zip(shown, values):
        number, decimals = figure_value(fig)
        if abs(value - number) > 0.5 * 10**-decimals + 1e-9:
            problems.append(f"README says {fig}, `{rel}` `{key}` = {value:.6g} ({value:.{decimals}f} as shown)")
    return problems


def check_machine(row: dict[str, str]) -> list[str]:
    cell = row["machine, date"]
    named = {n for n in KNOWN_MACHINES if n in cell}
    named_cores = {int(c) for c in re.findall(r"(\d+) cores?\b", cell)}
    named_dates = set(re.findall(r"\d{4}-\d{2}-\d{2}", cell))
    problems = [] if named_dates else [f"no date in {cell!r}"]
    machines, cores, dates = set(), set(), set()
    for rel, _ in sources(row["source"]):
        m, c, d = recorded(load(rel))
        machines |= m
        cores |= c
        if d and not d & named_dates:
            problems.append(f"{rel} records {sorted(d)}, the row says {sorted(named_dates)}")
        dates |= d
    if named != machines:
        problems.append(f"the row names {sorted(named) or 'no model'}, the JSON records {sorted(machines) or 'none'}")
    if dates and not named_dates <= dates:
        problems.append(f"the row says {sorted(named_dates)}, the JSON records {sorted(dates)}")
    if cores and not machines & GPU_MODELS and not named_cores:
        problems.append(f"a CPU run: name its cores ({sorted(cores)} recorded)")
    if named_cores and not named_cores <= cores:
        problems.append(f"the row says {sorted(named_cores)} cores, the JSON records {sorted(cores) or 'none'}")
    return problems


HEADER, ROWS = table_rows(numbers_section(README.read_text()))
ROW_DICTS = [dict(zip(HEADER, cells)) for cells in ROWS]
IDS = [re.sub(r"[^\w]+", "-", r.get("what", "?"))[:50].strip("-") for r in ROW_DICTS]


def test_the_numbers_table_has_a_source_for_every_row():
    assert HEADER == COLUMNS
    assert len(ROWS) >= 10
    for row in ROW_DICTS:
        assert len(row) == len(COLUMNS), row
        files = sources(row["source"])
        assert files, f"no JSON named for {row['what']!r}"
        for rel, keys in files:
            assert rel.startswith("bench/results/"), rel
            assert keys, f"{rel} is named without a key in {row['what']!r}"


@pytest.mark.parametrize("row", ROW_DICTS, ids=IDS)
def test_each_figure_is_what_its_json_records(row):
    assert not check_figures(row), "\n".join(check_figures(row))


@pytest.mark.parametrize("row", ROW_DICTS, ids=IDS)
def test_each_row_names_the_machine_and_date_its_json_records(row):
    assert not check_machine(row), "\n".join(check_machine(row))


def test_the_numbers_section_links_resolve():
    section = numbers_section(README.read_text())
    missing = []
    for target in re.findall(r"\]\(([^)\s]+)\)", section):
        path = target.split("#", 1)[0]
        if path and not re.match(r"[a-z]+://", path) and not (REPO / path).exists():
            missing.append(target)
    assert not missing, missing


# --- the checker itself -----------------------------------------------------------------------


def test_figures_skip_labels_code_and_link_targets():
    text = "p50 **6.4 ms**, 0 5xx, 8B `x 12` [a](b/c-2.json) 1,422 −0.0006 ±0.000 40/40 gpt-4o 7.6×"
    assert figures(text) == ["6.4", "0", "1,422", "−0.0006", "0.000", "40", "40", "7.6"]
    assert figure_value("1,422") == (1422.0, 0)
    assert figure_value("−0.0006") == (-0.0006, 4)


def test_keys_compute_ratios_wildcards_and_dotted_names():
    data = {"a": {"x-1": 2.0, "x-2": 3.0}, "b": [10, {"c": -0.5}], "t": {"k.0.8": 4}}
    assert evaluate("b.0 / a.x-1", data) == 5.0
    assert evaluate("max(a.x-*) * 1000", data) == 3000.0
    assert evaluate("max(abs(b.1.c))", data) == 0.5
    assert evaluate("len(a.*)", data) == 2
    assert evaluate("t.k.0.8 - 1e0", data) == 3.0
    with pytest.raises(ValueError):
        evaluate("(a.x-1, 2)", data)  # a tuple: only numbers, paths, + - * / and the four functions
    with pytest.raises(KeyError):
        evaluate("a.x-3", data)


def test_a_drifted_figure_or_machine_is_caught():
    row = next(r for r in ROW_DICTS if "router_latency_2026-11-29.json" in r["source"])
    assert not check_figures(row) and not check_machine(row)
    drifted = dict(row, measured=row["measured"].replace("6.4", "6.3", 1))
    assert any("README says 6.3" in p for p in check_figures(drifted))
    fewer = dict(row, measured=row["measured"].replace("228", "many", 1))
    assert check_figures(fewer)
    wrong_cpu = dict(row, **{"machine, date": row["machine, date"].replace("Intel Xeon", "AMD EPYC")})
    assert check_machine(wrong_cpu)
    wrong_date = dict(row, **{"machine, date": row["machine, date"].replace("2026-11-29", "2026-11-23")})
    assert check_machine(wrong_date)
