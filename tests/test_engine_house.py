"""The shape of the engine (DESIGN.md, "The house"), checked on the source with ``ast``:
no import circles and no private names imported across modules in ``pydagnn/``; the
engine reads only attributes that ``Layer`` declares; no GM layer names in the trainer
or the loader; one ``rel_err``. Plus the public entry points the split must keep."""
import ast
import os
import subprocess
import sys

import numpy as np
import pytest

import pydagnn
from pydagnn.layer import Layer

PKG = os.path.dirname(os.path.abspath(pydagnn.__file__))


def _modules():
    """{dotted module name: path} of pydagnn/ (top level and its subpackages)."""
    out = {}
    for root, _, files in os.walk(PKG):
        for f in files:
            if f.endswith('.py'):
                rel = os.path.relpath(os.path.join(root, f), PKG)[:-3].replace(os.sep, '.')
                name = 'pydagnn' if rel == '__init__' else 'pydagnn.' + rel.removesuffix('.__init__')
                out[name] = os.path.join(root, f)
    return out


def _tree(path):
    with open(path, encoding='utf-8') as fh:
        return ast.parse(fh.read(), path)


def _resolve(module, node):
    """The absolute module an ``ImportFrom`` names, from ``module``."""
    if not node.level:
        return node.module or ''
    package = module.split('.') if module in _package_names() else module.split('.')[:-1]
    base = package[:len(package) - node.level + 1]
    return '.'.join(base + ([node.module] if node.module else []))


def _package_names():
    return {m for m, p in _modules().items() if p.endswith('__init__.py')}


def _imports(module, tree, top_level_only):
    """(imported module, imported name or None, lineno) for the imports of a module."""
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    mods = _modules()
    for node in nodes:
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, None, node.lineno
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node)
            for a in node.names:
                sub = f'{target}.{a.name}'
                if sub in mods:                 # ``from . import backend``: the module itself
                    yield sub, None, node.lineno
                else:
                    yield target, a.name, node.lineno


def _graph(top_level_only):
    mods = _modules()
    graph = {}
    for m, path in mods.items():
        deps = set()
        for target, _, _ in _imports(m, _tree(path), top_level_only):
            while target and target not in mods:
                target = target.rpartition('.')[0]
            if target and target != m and not m.startswith(target + '.'):
                deps.add(target)     # a package importing its own submodules is not a circle
        graph[m] = deps
    return graph


def _cycles(graph):
    found, state, stack = [], {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for d in sorted(graph.get(n, ())):
            if state.get(d) == 1:
                found.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[n] = 2
    for n in sorted(graph):
        if n not in state:
            visit(n)
    return found


def _top_level(module):
    return module.count('.') <= 1 and module not in _package_names() - {'pydagnn'}


def test_no_import_circles():
    """Module-level imports form no circle; neither do the deferred ones inside
    functions (which would only hide one) through a top-level module of pydagnn/."""
    assert _cycles(_graph(top_level_only=True)) == []
    assert [c for c in _cycles(_graph(top_level_only=False)) if any(map(_top_level, c))] == []


def test_no_private_names_imported_across_modules():
    """No top-level module of pydagnn/ imports another pydagnn module's private name."""
    bad = []
    for m, path in _modules().items():
        if not _top_level(m):
            continue
        for target, name, line in _imports(m, _tree(path), top_level_only=False):
            if name and name.startswith('_') and not name.startswith('__') and target != m \
                    and target.split('.')[0] == 'pydagnn':
                bad.append(f'{path}:{line}: from {target} import {name}')
    assert bad == []


def _block_attributes(path):
    """Names read as ``<something>.block.<name>`` in a source file."""
    names = set()
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) \
                and node.value.attr == 'block':
            names.add(node.attr)
    return names


@pytest.mark.parametrize('module', ['dagnn.py', 'executor.py', 'train.py', 'finite.py'])
def test_engine_reads_only_declared_block_attributes(module):
    path = os.path.join(PKG, module)
    undeclared = sorted(n for n in _block_attributes(path) if not hasattr(Layer, n)
                        and n not in ('__dict__',))
    assert undeclared == []
    # and nothing is probed: no getattr(..block.., ...) / hasattr(..block.., ...)
    probes = [n.lineno for n in ast.walk(_tree(path)) if isinstance(n, ast.Call)
              and isinstance(n.func, ast.Name) and n.func.id in ('getattr', 'hasattr')
              and 'block' in ast.unparse(n.args[0]) and not isinstance(n.args[1], ast.Name)]
    assert probes == []


def _code_strings(path):
    """String constants of a file, docstrings excluded."""
    tree = _tree(path)
    docs = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
            if node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant):
                docs.add(id(node.body[0].value))
    return [n.value for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs]


@pytest.mark.parametrize('module', ['train.py', os.path.join('io', 'matconvnet.py'), 'dagnn.py', 'executor.py',
                                    'routing.py', 'finite.py'])
def test_no_gm_layer_names_outside_models(module):
    """GM knowledge is reached through the declared hooks (trainer_reads, train_stats,
    net_finalizer), not by layer or var names."""
    hits = [s for s in _code_strings(os.path.join(PKG, module))
            if s in ('gating', 'Balance_loss', 'BalanceLoss', 'H_x', 'CM_out')]
    assert hits == []


def test_one_rel_err():
    defs = [m for m, p in _modules().items() for n in ast.walk(_tree(p))
            if isinstance(n, ast.FunctionDef) and n.name == 'rel_err']
    assert defs == ['pydagnn.testing']
    from pydagnn import parity, parity_layers, testing
    assert parity.rel_err is testing.rel_err and parity_layers.rel_err is testing.rel_err


def test_public_entry_points():
    from pydagnn import DagNN, EvalError  # noqa: F401
    from pydagnn.dagnn import EvalError as E2
    from pydagnn.executor import EvalError as E3
    from pydagnn.layers import CM_out, Conv  # noqa: F401
    assert E2 is EvalError is E3
    code = ('import sys, pydagnn\n'
            'assert "pydagnn.models" not in sys.modules and "pydagnn.train" not in sys.modules\n'
            'assert "pydagnn.io" not in sys.modules\n'
            'assert callable(pydagnn.models.build) and callable(pydagnn.train.cnn_train_dag)\n'
            'assert callable(pydagnn.io.load_matconvnet) and callable(pydagnn.load_matconvnet)\n'
            'import pydagnn.io.imdb\n')
    subprocess.run([sys.executable, '-c', code], check=True)


def test_after_backward_hooks_see_the_complete_param_derivatives():
    from pydagnn.layers import Conv
    net = pydagnn.DagNN()
    net.add_layer('c', Conv(size=[1, 1, 2, 3], hasBias=True), 'x', 'y', ['f', 'b'])
    net.init_params(np.random.default_rng(0))
    seen = []
    net.executor.after_backward_hooks.append(
        lambda n: seen.append({p.name: None if p.der is None else p.der.copy() for p in n.params}))
    x = np.ones((2, 2, 2, 1), np.float32, order='F')
    net.eval({'x': x})
    assert seen == []                               # no backward, no hook
    net.eval({'x': x}, {'y': 1})
    assert len(seen) == 1
    for p in net.params:
        np.testing.assert_array_equal(seen[0][p.name], p.der)
