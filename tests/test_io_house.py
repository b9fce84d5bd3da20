"""The house rules of pydagnn.io (issue 10): one MAT codec, no import circles, no module
reaching into another's private names."""
import ast
import os

import pydagnn

ROOT = os.path.dirname(pydagnn.__file__)
IO = os.path.join(ROOT, 'io')


def _module_name(path):
    rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, '.')
    return rel[:-len('.__init__')] if rel.endswith('.__init__') else rel


def _resolve(module, node):
    """The absolute module an ImportFrom names (``from . import x`` -> the package)."""
    if node.level == 0:
        return node.module or ''
    pkg = module.split('.')[:-1]    # a module's package; for 'pkg.__init__' the package itself
    base = pkg[:len(pkg) - (node.level - 1)]
    return '.'.join(base + ([node.module] if node.module else []))


def _imports(path):
    """[(imported module, imported name or None, line)] of every import in the file,
    also those inside functions."""
    module = _module_name(path)
    if os.path.basename(path) == '__init__.py':
        module += '.__init__'
    tree = ast.parse(open(path, encoding='utf-8').read(), path)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node)
            for a in node.names:
                out.append((target, a.name, node.lineno))
    return out


def _files(folder):
    for dirpath, _, names in os.walk(folder):
        for n in sorted(names):
            if n.endswith('.py'):
                yield os.path.join(dirpath, n)


def _io_graph():
    mods = {_module_name(p): p for p in _files(IO)}
    graph = {}
    for m, p in mods.items():
        deps = set()
        for target, name, _ in _imports(p):
            for cand in (f'{target}.{name}' if name else None, target):
                if cand in mods and cand != m and cand != 'pydagnn.io':
                    deps.add(cand)
                    break
        graph[m] = deps
    return graph


def test_no_import_cycles_in_io():
    graph = _io_graph()
    done, stack = set(), []

    def visit(m):
        if m in stack:
            raise AssertionError('import circle: ' + ' -> '.join(stack[stack.index(m):] + [m]))
        if m in done:
            return
        stack.append(m)
        for d in sorted(graph[m]):
            visit(d)
        stack.pop()
        done.add(m)

    for m in sorted(graph):
        visit(m)
    # the codec stands on the two leaves (its errors, the naming of its temp files) and on
    # its read caps, which stand on its errors alone
    leaves = {'pydagnn.io.errors', 'pydagnn.io.tmpfiles'}
    assert 'pydagnn.io.matfile' in graph and \
        not graph['pydagnn.io.matfile'] - leaves - {'pydagnn.io.limits'}
    assert all(not graph[m] for m in leaves)
    assert not graph['pydagnn.io.limits'] - {'pydagnn.io.errors'}


def test_no_private_names_across_modules():
    """No file in pydagnn imports a _private name of a pydagnn.io module, and no io module
    imports another module's _private name."""
    bad = []
    for p in _files(ROOT):
        in_io = p.startswith(IO + os.sep)
        for target, name, line in _imports(p):
            if not target.startswith('pydagnn') or not name or not name.startswith('_') or name == '__version__':
                continue
            if in_io or target.startswith('pydagnn.io'):
                if os.path.abspath(p) != os.path.abspath(os.path.join(os.path.dirname(ROOT), *target.split('.')) + '.py'):
                    bad.append(f'{os.path.relpath(p, ROOT)}:{line}: from {target} import {name}')
    assert not bad, '\n'.join(bad)


def test_one_mat_codec():
    """Only matfile.py opens MAT files with h5py or scipy.io, or writes MAT headers."""
    offenders = []
    for p in _files(IO):
        if os.path.basename(p) == 'matfile.py':
            continue
        for target, name, line in _imports(p):
            if target.split('.')[0] in ('h5py', 'scipy') or (target == 'scipy' and name == 'io'):
                offenders.append(f'{os.path.basename(p)}:{line}: {target} {name or ""}')
    assert not offenders, '\n'.join(offenders)
