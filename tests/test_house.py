"""The house rules of the layer library (docs/CONVENTIONS.md, "Layer library"), checked on
the source with ``ast``:

* no module of ``layers/`` imports another module's private (``_name``) names, nor reads
  them as ``module._name``;
* ``layers/kernels/*`` never import a layer (nor ``pydagnn.layer``): kernels are strictly
  below the ops;
* no import circles among the modules of ``layers/``, counting the imports inside
  functions (the lazy ones that used to hide circles);
* every module imports without cupy.
"""
import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAYERS = ROOT / 'layers'
PKG = 'pydagnn.layers'


def _modules():
    """{module name: path} of every module of the layer library."""
    out = {}
    for p in sorted(LAYERS.rglob('*.py')):
        rel = p.relative_to(LAYERS).with_suffix('')
        parts = [] if rel.name == '__init__' else [rel.name]
        parts = list(rel.parent.parts) + parts
        out['.'.join([PKG] + parts)] = p
    return out


MODULES = _modules()


def _package(name, path):
    return name if path.name == '__init__.py' else name.rpartition('.')[0]


def _imports(name, path):
    """``(target module, imported name or None, line)`` for every import of the module,
    at any depth; ``imported name`` is set for ``from X import name`` when ``X.name`` is
    not itself a module."""
    tree = ast.parse(path.read_text(), str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                out.append((a.name, None, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _package(name, path)
                for _ in range(node.level - 1):
                    base = base.rpartition('.')[0]
                src = f'{base}.{node.module}' if node.module else base
            else:
                src = node.module
            for a in node.names:
                full = f'{src}.{a.name}'
                if full in MODULES:
                    out.append((full, None, node.lineno))
                else:
                    out.append((src, a.name, node.lineno))
    return out


def _aliases(name, path):
    """Local names bound to pydagnn modules by the module's imports."""
    tree = ast.parse(path.read_text(), str(path))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = _package(name, path) if node.level else None
            for a in node.names:
                src = (f'{base}.{node.module}' if node.module else base) if node.level else node.module
                if src and src.startswith('pydagnn') and f'{src}.{a.name}' in MODULES:
                    out.add(a.asname or a.name)
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith('pydagnn') and a.asname:
                    out.add(a.asname)
    return out, tree


def _private(n):
    return n.startswith('_') and not (n.startswith('__') and n.endswith('__'))


@pytest.mark.parametrize('name', sorted(MODULES))
def test_no_private_imports_across_modules(name):
    path = MODULES[name]
    bad = [f'line {line}: from {src} import {what}' for src, what, line in _imports(name, path)
           if what is not None and _private(what) and src.startswith('pydagnn') and src != name]
    aliases, tree = _aliases(name, path)
    bad += [f'line {n.lineno}: {n.value.id}.{n.attr}' for n in ast.walk(tree)
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
            and n.value.id in aliases and _private(n.attr)]
    assert not bad, f'{name} uses private names of other modules: {bad}'


@pytest.mark.parametrize('name', sorted(n for n in MODULES if n.startswith(f'{PKG}.kernels')))
def test_kernels_import_no_layer(name):
    bad = [f'line {line}: {src}' for src, _, line in _imports(name, MODULES[name])
           if src == 'pydagnn.layer' or (src.startswith(f'{PKG}') and not src.startswith(f'{PKG}.kernels'))]
    assert not bad, f'{name} (a kernel module) imports layers: {bad}'


def test_no_import_circles():
    graph = {n: sorted({src for src, _, _ in _imports(n, p) if src in MODULES and src != n})
             for n, p in MODULES.items() if not p.name == '__init__.py'}
    state, stack, circles = {}, [], []

    def visit(n):
        state[n] = 'open'
        stack.append(n)
        for m in graph.get(n, ()):
            if state.get(m) == 'open':
                circles.append(stack[stack.index(m):] + [m])
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = 'done'
    for n in graph:
        if n not in state:
            visit(n)
    assert not circles, 'import circles: ' + '; '.join(' -> '.join(c) for c in circles)


def test_every_module_imports_without_cupy():
    names = sorted(MODULES)
    code = ('import sys; sys.modules["cupy"] = None\n'
            'import importlib\n'
            f'for n in {names!r}:\n'
            '    importlib.import_module(n)\n'
            'print("ok")\n')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == 'ok'
