"""The package's shape: no import circle between its modules, deferred (in-function) imports included."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dsutil"


def imports_of(path: Path, modules: set[str]) -> set[str]:
    deps = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            deps |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
    return deps & modules


def test_no_module_imports_itself_through_others():
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    graph = {m: imports_of(PACKAGE / f"{m}.py", modules) for m in modules}
    state: dict[str, str] = {}

    def visit(m, path):  # depth-first; a module met again while on the path closes a circle
        state[m] = "open"
        for d in sorted(graph[m]):
            assert state.get(d) != "open", "import circle: " + " -> ".join([*path, m, d])
            if d not in state:
                visit(d, [*path, m])
        state[m] = "done"

    for m in sorted(modules):
        if m not in state:
            visit(m, [])
    assert {"runner", "config", "frontier", "squeeze", "recover"} <= modules and graph["frontier"] >= {"runner"}


def test_dsutil_speaks_through_its_logger_from_rank_0_only_to_the_stdout_of_the_moment(monkeypatch, capsys):
    from dsutil import runtime

    runtime.show_log()
    runtime.show_log()
    assert sum(isinstance(h, runtime._Stdout) for h in runtime.log.handlers) == 1  # once per process
    runtime.log.info("from rank 0")
    monkeypatch.setattr(runtime, "rank", lambda: 1)  # as under torchrun, on another rank
    runtime.log.info("from rank 1")
    assert capsys.readouterr().out == "from rank 0\n"  # pytest's capture, made after the handler
