"""The package's import graph is a DAG, the reading path imports no tool, and imports sit at the top of each
module (allowed inside functions: the PEP 562 lazy exports of __init__ and ZeroRedundancyOptimizer, a 2 s
import needed only when distributed). `python tests/test_imports.py` prints the graph and the line counts."""
import ast
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "llava_min"
READING_PATH = ["internlm2", "dinov2", "clip", "siglip", "projector", "llava", "lora", "weights",
                "tokenizer", "data", "image", "spmproto", "sampler", "loader", "dist", "optim", "checkpoint", "fsdp",
                "parallel", "__init__"]
LOCAL_ALLOWED = {("__init__", "importlib"), ("optim", "torch.distributed.optim"),
                 ("internlm2", "torch.nn.attention.varlen")}


def module_name(file: pathlib.Path) -> str:
    return ".".join(file.relative_to(PACKAGE).with_suffix("").parts)


def graph() -> tuple[dict[str, set[str]], list[tuple[str, str, int]]]:
    """{module: modules of the package it imports} (without `if __name__ == "__main__":` blocks, which run
    only as a command), and the imports found inside functions."""
    modules = {module_name(f) for f in PACKAGE.rglob("*.py")}
    edges, local = {}, []
    for file in sorted(PACKAGE.rglob("*.py")):
        name = module_name(file)
        tree = ast.parse(file.read_text())
        tree.body = [n for n in tree.body if not (isinstance(n, ast.If) and "__main__" in ast.unparse(n.test))]
        here = name.split(".")[:-1]   # the package a relative import starts from
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = here[:len(here) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                names = [target] if node.module else [f"{target}.{a.name}".lstrip(".") for a in node.names]
                deps |= {n for n in names if n in modules}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("llava_min."):
                deps.add(node.module.removeprefix("llava_min."))
        for fn in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            for sub in ast.walk(fn):
                if isinstance(sub, ast.Import):
                    local += [(name, a.name, sub.lineno) for a in sub.names]
                elif isinstance(sub, ast.ImportFrom):
                    local.append((name, "." * sub.level + (sub.module or ""), sub.lineno))
        edges[name] = deps - {name, "__init__"}
    return edges, local


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(m, path):
        state[m] = "open"
        for d in sorted(edges.get(m, ())):
            if state.get(d) == "open":
                found.append(path[path.index(d):] + [d])
            elif d not in state:
                visit(d, path + [d])
        state[m] = "done"
    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    return found


def test_no_import_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]   # the check itself sees one
    assert cycles(graph()[0]) == []


def test_reading_path_imports_no_tool():
    edges = graph()[0]
    assert {m: sorted(d for d in edges[m] if d.startswith("tools")) for m in READING_PATH} == \
        {m: [] for m in READING_PATH}


def test_imports_at_the_top():
    assert [x for x in graph()[1] if (x[0], x[1]) not in LOCAL_ALLOWED] == []


if __name__ == "__main__":
    edges, _ = graph()
    for m in sorted(edges):
        print(f"{m:24s} <- {', '.join(sorted(edges[m])) or '-'}")
    count = lambda files: sum(len(f.read_text().splitlines()) for f in files)  # noqa: E731
    reading = [PACKAGE / f"{m}.py" for m in READING_PATH] + [ROOT / "train.py", ROOT / "finetune.py"]
    print(f"reading path: {count(reading)} lines ({len(reading)} files); "
          f"tools: {count(sorted((PACKAGE / 'tools').glob('*.py')))} lines; "
          f"cycles: {cycles(edges) or 'none'}")
    sys.exit(0)
