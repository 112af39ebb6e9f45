"""Write ``cupy14_api.json``: every name ``cupy`` exports, and every ``cupy.ndarray`` method, with its keywords.

Run against a CuPy git checkout (the stand-in ships the generated file; regenerate it for a new CuPy)::

    python tests/cupy_standin/generate_api.py /path/to/cupy.git v14.2.0

It reads the sources of that tag with ``git show`` (nothing is built or imported): the ``from ... import``
lines of ``cupy/__init__.py`` and of the ``cupy.random`` / ``cupy.linalg`` packages, followed to the
``def``/``cpdef`` (Python or Cython) or the ``create_ufunc``-like assignment that defines each name, and the
methods of ``_ndarray_base`` in ``cupy/_core/core.pyx``.  A name whose definition it cannot find is kept
with ``"params": null`` (any arguments accepted, said in the file).
"""
from __future__ import annotations

import ast
import json
import pathlib
import re
import subprocess
import sys

UFUNC_FACTORIES = ("create_ufunc", "create_math_ufunc", "create_arithmetic", "create_comparison",
                   "_create_ufunc", "ufunc", "create_reduction_func", "_fusion_thread_local")


def show(repo, tag, path):
    r = subprocess.run(["git", "--git-dir", repo, "show", f"{tag}:{path}"], capture_output=True, text=True)
    return r.stdout if r.returncode == 0 else None


def module_source(repo, tag, module):
    base = module.replace(".", "/")
    for path in (f"{base}.py", f"{base}.pyx", f"{base}/__init__.py"):
        text = show(repo, tag, path)
        if text is not None:
            return path, text
    return None, None


def split_params(text):
    depth, cur, out = 0, "", []
    for ch in text:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur)
    return [p.strip() for p in out if p.strip()]


def cython_signature(params_text):
    params, kwonly, varargs, varkw, seen_star = [], [], False, False, False
    for p in split_params(re.sub(r"#[^\n]*", "", params_text)):
        if p == "*":
            seen_star = True
            continue
        if p.startswith("**"):
            varkw = True
            continue
        if p.startswith("*"):
            varargs, seen_star = True, True
            continue
        if p == "/":
            continue
        name = re.findall(r"(\w+)\s*(?:=|$)", p.split("=")[0].strip() + ("=" if "=" in p else ""))
        name = name[-1] if name else p.split()[-1]
        if name == "self":
            continue
        (kwonly if seen_star else params).append(name)
    return {"params": params, "kwonly": kwonly, "varargs": varargs, "varkw": varkw}


def python_signature(fn: ast.FunctionDef):
    a = fn.args
    return {"params": [x.arg for x in a.posonlyargs + a.args if x.arg != "self"],
            "kwonly": [x.arg for x in a.kwonlyargs], "varargs": a.vararg is not None, "varkw": a.kwarg is not None}


def find_definition(repo, tag, module, name, depth=0):
    """``(kind, signature)`` of ``name`` in ``module``, following re-exports."""
    if depth > 6:
        return "unknown", None
    path, text = module_source(repo, tag, module)
    if text is None:
        return "unknown", None
    if path.endswith(".py"):
        try:
            tree = ast.parse(text)
        except SyntaxError:
            tree = None
        if tree is not None:
            for node in tree.body:
                if isinstance(node, ast.FunctionDef) and node.name == name:
                    return "function", python_signature(node)
                if isinstance(node, ast.ClassDef) and node.name == name:
                    return "class", None
                if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
                    src = ast.get_source_segment(text, node.value) or ""
                    if isinstance(node.value, ast.Call) and any(f in src.split("(")[0] for f in UFUNC_FACTORIES):
                        return "ufunc", None
                    if isinstance(node.value, ast.Attribute) or isinstance(node.value, ast.Name):
                        target = ast.unparse(node.value)
                        return "alias:" + target, None
                    return "object", None
            for node in tree.body:
                if isinstance(node, ast.ImportFrom) and node.module:
                    for alias in node.names:
                        if (alias.asname or alias.name) == name:
                            mod = node.module
                            if node.level:
                                parts = module.split(".")
                                if not path.endswith("__init__.py"):
                                    parts = parts[:-1]
                                mod = ".".join(parts[:len(parts) - node.level + 1] + ([mod] if mod else []))
                            return find_definition(repo, tag, mod, alias.name, depth + 1)
        return "unknown", None
    # Cython
    m = re.search(rf"^(?:cp)?def\s+(?:[\w\[\]\.]+\s+)*{re.escape(name)}\s*\((.*?)\)\s*(?:except[^:]*)?:", text,
                  re.M | re.S)
    if m:
        return "function", cython_signature(m.group(1))
    m = re.search(rf"^(?:cdef\s+\w+\s+)?{re.escape(name)}\s*=\s*([\w\.]+)", text, re.M)
    if m:
        kind = "ufunc" if any(f in m.group(1) for f in UFUNC_FACTORIES) else "object"
        return kind, None
    for m in re.finditer(r"^from\s+([\w\.]+)\s+(?:c)?import\s+(.*)$", text, re.M):
        for part in m.group(2).split(","):
            words = part.split()
            if words and (words[-1] == name):
                return find_definition(repo, tag, m.group(1), words[0], depth + 1)
    return "unknown", None


def exports(repo, tag, package):
    path, text = module_source(repo, tag, package)
    names = {}
    tree = ast.parse(text)
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                exported = alias.asname or alias.name
                if exported.startswith("_"):
                    continue
                if node.module == "numpy":
                    names[exported] = {"kind": "numpy-constant", "params": None}
                    continue
                kind, sig = find_definition(repo, tag, node.module, alias.name)
                names[exported] = {"kind": kind, **(sig or {"params": None})}
        elif isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
            names[node.name] = {"kind": "function", **python_signature(node)}
        elif isinstance(node, ast.Assign):
            for t in node.targets:
                if isinstance(t, ast.Name) and not t.id.startswith("_"):
                    names[t.id] = {"kind": "constant", "params": None}
    return names


def ndarray_methods(repo, tag):
    text = show(repo, tag, "cupy/_core/core.pyx")
    start = text.index("cdef class _ndarray_base")
    body = text[start:]
    first = body.index("\n") + 1
    end = re.search(r"^[^\s#]", body[first:], re.M)
    body = body[: first + end.start()] if end else body
    methods, attributes = {}, []
    for m in re.finditer(r"^    ((?:@property\n    )?)(?:cpdef|def)\s+(?:[\w\[\]\.]+\s+)*(\w+)\s*\((.*?)\)\s*(?:except[^:]*)?:",
                         body, re.M | re.S):
        decorator, name, params = m.groups()
        if decorator or name in ("__init__", "_init"):
            if decorator:
                attributes.append(name)
            continue
        methods[name] = cython_signature(params)
    attributes += re.findall(r"^    property\s+(\w+)\s*:", body, re.M)
    return methods, sorted(set(attributes))


def main(repo, tag):
    api = {"cupy_version": tag, "generated_by": "tests/cupy_standin/generate_api.py",
           "functions": exports(repo, tag, "cupy")}
    for sub in ("random", "linalg"):
        api[sub] = exports(repo, tag, f"cupy.{sub}")
    api["ndarray_methods"], api["ndarray_attributes"] = ndarray_methods(repo, tag)
    out = pathlib.Path(__file__).with_name("cupy14_api.json")
    out.write_text(json.dumps(api, indent=1, sort_keys=True) + "\n")
    unknown = [n for n, v in api["functions"].items() if v["kind"] == "unknown"]
    print(f"{out}: {len(api['functions'])} names ({len(unknown)} without a found definition), "
          f"{len(api['ndarray_methods'])} ndarray methods")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "v14.2.0")
