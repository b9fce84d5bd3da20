"""MatConvNet model files (``.mat``) <-> :class:`pydagnn.DagNN`.

:func:`load_matconvnet` reads

* a DagNN struct as ``dagnn.DagNN.saveobj`` writes it, saved at top level (variables
  ``vars``, ``params``, ``layers``, ``meta``, maybe ``executionOrder``) or nested as the
  variable ``net`` (training checkpoints ``net-epoch-N.mat`` also hold ``state`` and
  ``stats``); MATLAB v5/v7 and v7.3 (HDF5);
* an old DagNN struct whose layers have no ``type`` field (the type is inferred from the
  block's property names: the registered block whose properties are exactly those);
* a SimpleNN struct (``layers`` a cell array of structs), converted as
  ``dagnn.DagNN.fromSimpleNN`` does after ``vl_simplenn_tidy``.

:func:`save_matconvnet` writes the struct ``dagnn.DagNN.loadobj`` accepts (v7 or v7.3).

Normalisation on load
---------------------
Param values become NumPy arrays with MatConvNet shapes, dtype kept (float32 in
practice), Fortran order: conv filters 4-D ``(FH, FW, Cin, Cout)`` (the trailing
singleton dims MATLAB drops are restored), biases and BN gains/biases 1-D ``(C,)``,
BN moments ``(C, 2)``, ``H_x`` weights 2-D ``(D, K)``; other params keep the file's
shape. Block properties use the block class's defaults as type hints: a 1x1 value
becomes a scalar, a row or column a list, a matrix stays an array; logical (or
Octave's uint8 0/1 where the default is a bool) -> bool, doubles -> int where the
default is an int (or unknown) and the value integral, else float; char -> str; cell
-> list; empty cell -> ``[]``; empty double -> ``[]`` where the default is a list,
else None. On save the inverse: numbers -> double, bools -> logical, lists of numbers
-> rows, other lists -> cell rows, ``[]`` -> ``{}`` for ``opts``-like (cell) properties
and ``[]`` otherwise, 1-D params -> ``C x 1``.
"""
import copy
import importlib
import os
import warnings

import numpy as np

from ..layer import Layer, REGISTRY, shape_by_role
from .errors import MatFileError
from .matfile import MatCell, MatObject, MatStruct, read_mat, to_matlab, to_python, write_mat

__all__ = ['load_matconvnet', 'save_matconvnet', 'net_from_struct', 'net_to_struct', 'from_simplenn',
           'UnusableLayer', 'UnknownLayerTypeError', 'MatFileError']


class UnknownLayerTypeError(MatFileError):
    """A layer's type is not a registered block (``strict=True``)."""


class UnusableLayer(Layer):
    """Stands in for a layer whose type pydagnn does not implement (``strict=False``).

    It keeps the layer's MatConvNet type (``type_name``) and stored properties so that
    :func:`save_matconvnet` writes them back unchanged; evaluating it raises
    NotImplementedError naming the layer, its type and the file.
    """
    type_name = 'dagnn.Layer'
    properties = {}

    def __init__(self, type_name='dagnn.Layer', layer_name='?', props=None, source=None, reason=None):
        self.props = dict(props or {})
        self.type_name = type_name
        self.layer_name = layer_name
        self.source = source
        self.reason = reason
        super().__init__()

    def load(self, props):
        self.props.update(dict(props))

    def save(self):
        return copy.deepcopy(self.props)

    def _fail(self):
        why = f' ({self.reason})' if self.reason else ''
        src = f' from {self.source}' if self.source else ''
        raise NotImplementedError(
            f'layer {self.layer_name!r} has type {self.type_name!r}, which pydagnn cannot evaluate{why}; '
            f'it was loaded with strict=False{src}. Replace the layer or register a block for that type.')

    def forward(self, inputs, params):
        self._fail()

    def backward(self, inputs, params, der_outputs, outputs=None):
        self._fail()

    def __repr__(self):
        return f'UnusableLayer({self.type_name!r}, layer={self.layer_name!r})'


def _registry():
    import pydagnn.layers  # noqa: F401  (registers every block type)
    return REGISTRY


# ---------------------------------------------------------------------------- properties
def _is_number(x):
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))


def _scalar_from_mat(x, hint, dtype):
    if dtype == np.bool_:
        return bool(x)
    if isinstance(hint, (bool, np.bool_)):
        if x in (0, 1):
            return bool(x)
        return float(x)
    if dtype.kind in 'iu':
        return int(x)
    if dtype.kind == 'c':
        return complex(x)
    x = float(x)
    if isinstance(hint, (float, np.floating)) and not isinstance(hint, (bool, np.bool_)):
        return x
    if np.isfinite(x) and x == int(x):
        return int(x)
    return x


def _prop_from_mat(v, hint, where, path):
    """A block property as the block expects it (see the module doc)."""
    if isinstance(v, MatObject):
        raise MatFileError(path, where, f'a MATLAB {v.classname} cannot be a block property')
    if isinstance(v, str):
        return v
    if isinstance(v, list):  # a char matrix
        return v
    if isinstance(v, MatCell):
        items = [_prop_from_mat(x, None, f'{where}{{{i + 1}}}', path) for i, x in enumerate(v.items)]
        return tuple(items) if isinstance(hint, tuple) else items
    if isinstance(v, MatStruct):
        return to_python(v, where)
    if not isinstance(v, np.ndarray):
        return v
    if isinstance(hint, np.ndarray):
        return v
    if v.size == 0:
        if isinstance(hint, (list, tuple)):
            return type(hint)()
        return None
    nonsingleton = [s for s in v.shape if s != 1]
    if len(nonsingleton) > 1:
        return v  # a matrix
    elem = hint
    if isinstance(hint, (list, tuple)):
        elem = hint[0] if hint else None
    items = [_scalar_from_mat(x, elem, v.dtype) for x in v.ravel(order='F')]
    if len(items) == 1:
        return items[0]
    return tuple(items) if isinstance(hint, tuple) else items


_CELL_PROPS = ('opts', 'cudnn')


def _prop_to_mat(name, value, hint):
    if isinstance(value, (list, tuple)):
        if not value:
            cell = name in _CELL_PROPS or (isinstance(hint, (list, tuple)) and hint
                                            and all(isinstance(h, str) for h in hint))
            return MatCell([], (0, 0)) if cell else np.zeros((0, 0))
        if all(isinstance(x, (bool, np.bool_)) for x in value):
            return np.array([list(value)], dtype=bool)
        if all(_is_number(x) for x in value):
            return np.array([[float(x) for x in value]])
    if value is None:
        return np.zeros((0, 0))
    return to_matlab(value, name)


# ---------------------------------------------------------------------------- field helpers
class _Ctx:
    def __init__(self, path, strict):
        self.path = path
        self.strict = strict

    def error(self, where, msg, cls=MatFileError):
        return cls(self.path, where or None, msg)

    def struct(self, v, where, required=()):
        if not isinstance(v, MatStruct):
            raise self.error(where, f'expected a struct array, got {_describe(v)}')
        missing = [f for f in required if f not in v.fields]
        if missing:
            raise self.error(where, f'has no field {missing[0]!r} (fields: {", ".join(v.fields) or "none"})')
        return v

    def string(self, v, where, allow_empty=False):
        if isinstance(v, np.ndarray) and v.size == 0:
            v = ''
        if not isinstance(v, str):
            raise self.error(where, f'expected a string, got {_describe(v)}')
        if not v and not allow_empty:
            raise self.error(where, 'is empty')
        return v

    def names(self, v, where):
        """A cellstr (or a single string, or empty) as a list of names."""
        if isinstance(v, str):
            return [v] if v else []
        if isinstance(v, np.ndarray) and v.size == 0:
            return []
        if isinstance(v, list) and all(isinstance(x, str) for x in v):
            return list(v)
        if not isinstance(v, MatCell):
            raise self.error(where, f'expected a cell array of names, got {_describe(v)}')
        out = []
        for i, x in enumerate(v.items):
            out.append(self.string(x, f'{where}{{{i + 1}}}'))
        return out

    def number(self, v, where):
        if isinstance(v, np.ndarray) and v.size == 1 and v.dtype.kind in 'biuf':
            return float(v.reshape(-1)[0])
        raise self.error(where, f'expected a number, got {_describe(v)}')


def _describe(v):
    if isinstance(v, np.ndarray):
        return f'a {"x".join(map(str, v.shape))} {v.dtype} array'
    if isinstance(v, (MatStruct, MatCell)):
        kind = 'struct' if isinstance(v, MatStruct) else 'cell'
        return f'a {"x".join(map(str, v.shape))} {kind}'
    if isinstance(v, MatObject):
        return f'a MATLAB {v.classname}'
    if isinstance(v, str):
        return f'the string {v[:60]!r}' + ('...' if len(v) > 60 else '')
    return type(v).__name__


# ---------------------------------------------------------------------------- loading
def load_matconvnet(path, strict=True, return_extra=False, max_bytes=None):
    """Load a MatConvNet model file as a :class:`pydagnn.DagNN`.

    strict: an unknown layer type (or a block property the block does not have) is an
        error; with ``strict=False`` such a layer gets an :class:`UnusableLayer` block
        (unknown properties are dropped with a warning) and the rest loads.
    return_extra: also return a dict of the file's other variables as plain Python
        (a checkpoint's ``state`` and ``stats``, a fixture's ``executionOrder``).
    max_bytes: the most the file may decode into memory (default ``$PYDAGNN_MAX_ARRAY_BYTES``
        or 8 GiB; see :mod:`pydagnn.io.limits` and docs/files.md).

    Raises MatFileError (naming the file and the field) for anything malformed.
    """
    path = os.fspath(path)
    data = read_mat(path, max_bytes=max_bytes)
    ctx = _Ctx(path, strict)
    try:
        net, extra = _load(data, ctx)
    except MatFileError:
        raise
    except (Exception, RecursionError) as e:  # anything unforeseen in a garbled file
        raise MatFileError(path, None, f'malformed MatConvNet model ({type(e).__name__}: {e})') from e
    return (net, extra) if return_extra else net


def _load(data, ctx):
    if 'net' in data and 'layers' not in data:
        s = data['net']
        if isinstance(s, MatObject):
            raise ctx.error('net', 'holds a MATLAB object (a dagnn.DagNN saved as an object); in MATLAB '
                                   're-save it as a struct: net = net.saveobj(); save(file, \'net\')')
        ctx.struct(s, 'net')
        if s.size != 1:
            raise ctx.error('net', f'expected a 1x1 struct, got {_describe(s)}')
        top = dict(s.elements[0])
        extra_vars = {k: v for k, v in data.items() if k != 'net'}
        prefix = 'net.'
    else:
        top = data
        extra_vars = {}
        prefix = ''
    if 'layers' not in top:
        raise ctx.error('', 'no `layers` variable: not a MatConvNet network (expected the variables '
                            'vars/params/layers/meta, or a struct `net` holding them)')
    layers = top['layers']
    if isinstance(layers, MatCell):
        net = from_simplenn(top, _ctx=ctx, _prefix=prefix)
        rest = {k: v for k, v in top.items() if k not in ('layers', 'meta', 'classes', 'normalization')}
        extra = {k: to_python(v, k) for k, v in {**rest, **extra_vars}.items()}
        return net, extra
    net = _from_dagnn_struct(top, ctx, prefix)
    rest = {k: v for k, v in top.items() if k not in ('vars', 'params', 'layers', 'meta')}
    extra = {k: to_python(v, k) for k, v in {**rest, **extra_vars}.items()}
    return net, extra


def net_from_struct(s, strict=True, source='<struct>'):
    """A DagNN from a saveobj struct already in memory (a dict of MatStruct/MatCell/arrays
    as :func:`pydagnn.io.matfile.read_mat` gives, e.g. ``read_mat(f)['net'].elements[0]``)."""
    ctx = _Ctx(source, strict)
    if isinstance(s.get('layers'), MatCell):
        return from_simplenn(s, _ctx=ctx)
    return _from_dagnn_struct(s, ctx, '')


def _infer_type(fields, n_inputs, reg):
    fields = set(fields)
    cands = sorted({cls.type_name for cls in reg.values() if set(cls.properties) == fields})
    if len(cands) > 1 and n_inputs > 1 and 'dagnn.Sum' in cands:
        return ['dagnn.Sum']
    return cands


def _from_dagnn_struct(top, ctx, prefix):
    from ..dagnn import DagNN
    reg = _registry()
    # dagnn.DagNN.loadobj needs only `layers`; `params` and `vars` are optional (a layer's
    # param missing from the table stays empty, as addLayer leaves it).
    if 'layers' not in top:
        raise ctx.error('', f'no `{prefix}layers` field: not a MatConvNet DagNN struct')
    L = ctx.struct(top['layers'], f'{prefix}layers', ('name', 'inputs', 'outputs', 'params', 'block'))
    P = _optional_table(top, 'params', ('name', 'value'), ctx, prefix)
    V = _optional_table(top, 'vars', ('name',), ctx, prefix)
    net = DagNN()
    seen = set()
    for i, e in enumerate(L.elements):
        w = f'{prefix}layers({i + 1})'
        name = ctx.string(e['name'], f'{w}.name')
        if name in seen:
            raise ctx.error(f'{w}.name', f'duplicate layer name {name!r}')
        seen.add(name)
        inputs = ctx.names(e['inputs'], f'{w}.inputs ({name})')
        outputs = ctx.names(e['outputs'], f'{w}.outputs ({name})')
        params = ctx.names(e['params'], f'{w}.params ({name})')
        braw = e['block']
        if isinstance(braw, np.ndarray) and braw.size == 0:
            bprops = {}
        else:
            b = ctx.struct(braw, f'{w}.block ({name})')
            if b.size != 1:
                raise ctx.error(f'{w}.block', f'expected a 1x1 struct, got {_describe(b)}')
            bprops = dict(b.elements[0])
        type_name = ''
        if 'type' in L.fields:
            t = e['type']
            type_name = ctx.string(t, f'{w}.type ({name})', allow_empty=True) if not (
                isinstance(t, np.ndarray) and t.size == 0) else ''
        block = _make_block(name, type_name, bprops, len(inputs), ctx, w, reg)
        try:
            net.add_layer(name, block, inputs, outputs, params)
        except (ValueError, KeyError) as err:
            raise ctx.error(w, f'layer {name!r}: {err}') from err

    # params
    file_params = {}
    for i, e in enumerate(P.elements):
        w = f'{prefix}params({i + 1})'
        pname = ctx.string(e['name'], f'{w}.name')
        if pname in file_params:
            raise ctx.error(f'{w}.name', f'duplicate param name {pname!r}')
        try:
            net.param_index(pname)
        except KeyError:
            # loadobj assigns to getParamIndex(name) = [], which does nothing
            warnings.warn(f'{ctx.path}: {w}: param {pname!r} is not used by any layer; ignored')
            continue
        file_params[pname] = (i, e)
    first_use = {}
    for layer in net.layers:
        for k, p in enumerate(layer.params):
            first_use.setdefault(p, (layer, k))
    for pname, (i, e) in file_params.items():
        w = f'{prefix}params({i + 1})'
        layer, k = first_use[pname]
        param = net.get_param(pname)
        value = e['value']
        if isinstance(value, np.ndarray) and value.size == 0:
            value = None
        elif not isinstance(value, np.ndarray) or value.dtype.kind not in 'biufc':
            raise ctx.error(f'{w}.value', f'param {pname!r}: expected a numeric array, got {_describe(value)}')
        else:
            try:
                value = layer.block.shape_param(k, value)
            except ValueError as err:
                raise ctx.error(f'{w}.value', f'param {pname!r} of layer {layer.name!r} '
                                              f'({layer.block.type_name}): {err}') from None
        param.value = value
        for field, attr in (('learningRate', 'learning_rate'), ('weightDecay', 'weight_decay')):
            if field in e:
                v = e[field]
                if isinstance(v, np.ndarray) and v.size == 0:
                    continue
                setattr(param, attr, ctx.number(v, f'{w}.{field} ({pname})'))
        if 'trainMethod' in e:
            tm = e['trainMethod']
            if not (isinstance(tm, np.ndarray) and tm.size == 0):
                tm = ctx.string(tm, f'{w}.trainMethod ({pname})')
                if tm not in ('gradient', 'average', 'notrain'):
                    raise ctx.error(f'{w}.trainMethod', f'unknown train method {tm!r} for param {pname!r}')
                param.train_method = tm
    for layer in net.layers:
        values = [net.get_param(p).value for p in layer.params]
        try:
            layer.block.check_param_shapes(values, layer.params)
        except ValueError as err:
            i = net.layer_index(layer.name)
            raise ctx.error(f'{prefix}layers({i + 1})',
                            f'layer {layer.name!r} ({layer.block.type_name}): {err}') from None

    # vars
    for i, e in enumerate(V.elements):
        w = f'{prefix}vars({i + 1})'
        vname = ctx.string(e['name'], f'{w}.name')
        try:
            var = net.get_var(vname)
        except KeyError:
            # as for params: loadobj's assignment to getVarIndex(name) = [] does nothing
            warnings.warn(f'{ctx.path}: {w}: var {vname!r} is not an input or output of any layer; ignored')
            continue
        if 'precious' in e:
            pr = e['precious']
            if isinstance(pr, np.ndarray) and pr.size == 1 and pr.dtype.kind in 'biuf':
                var.precious = bool(pr.reshape(-1)[0])
            elif not (isinstance(pr, np.ndarray) and pr.size == 0):
                raise ctx.error(f'{w}.precious', f'expected a logical, got {_describe(pr)}')

    # meta
    meta = top.get('meta')
    if meta is None or (isinstance(meta, np.ndarray) and meta.size == 0):
        net.meta = {}
    else:
        m = to_python(meta, f'{prefix}meta')
        net.meta = m if isinstance(m, dict) else {'meta': m}

    # execution order: the file's (when stored), then the GM routing and order
    if 'executionOrder' in top:
        eo = top['executionOrder']
        w = f'{prefix}executionOrder'
        if not isinstance(eo, np.ndarray) or eo.dtype.kind not in 'iuf':
            raise ctx.error(w, f'expected a numeric vector, got {_describe(eo)}')
        order = eo.reshape(-1)
        n = len(net.layers)
        if (order.size != n or not np.all(np.isfinite(order)) or np.any(order != np.round(order))
                or sorted(int(x) for x in order) != list(range(1, n + 1))):
            raise ctx.error(w, f'must be a permutation of 1..{n} (one index per layer)')
        try:
            net.set_execution_order([int(x) - 1 for x in order])
        except (ValueError, KeyError) as err:
            raise ctx.error(w, str(err)) from None
    _finalize(net, ctx)
    return net


def _finalize(net, ctx):
    """Call the net-finalize hook (:attr:`pydagnn.layer.Layer.net_finalizer`) of every
    block type present, once each, in layer order (e.g. a GM net's ``gating`` block:
    ``pydagnn.models.gm:finalize_gm`` sets the routes and the original's order)."""
    hooks = []
    for l in net.layers:
        spec = l.block.net_finalizer
        if spec and spec not in hooks:
            hooks.append(spec)
    for spec in hooks:
        module, _, func = spec.partition(':')
        try:
            hook = getattr(importlib.import_module(module), func)
        except (ImportError, AttributeError):  # pragma: no cover  (models not installed)
            warnings.warn(f'{ctx.path}: network loaded without its finalize hook: {spec} is unavailable')
            continue
        try:
            hook(net)
        except (ValueError, KeyError) as err:
            raise ctx.error('', f'cannot finalize the network ({spec}: the routing and execution '
                                f'order): {err}') from None


def _optional_table(top, field, required, ctx, prefix):
    """The struct array ``top[field]`` (``params`` / ``vars``), or an empty one when the
    field is absent or an empty array (loadobj: ``if isfield(s, field)``)."""
    v = top.get(field)
    if v is None or (isinstance(v, np.ndarray) and v.size == 0):
        return MatStruct(list(required), [], (0, 0))
    return ctx.struct(v, f'{prefix}{field}', required)


def _make_block(name, type_name, bprops, n_inputs, ctx, where, reg):
    """The block of a layer: its registered class with the file's properties, or an
    UnusableLayer (strict=False) for an unknown type."""
    if not type_name:
        cands = _infer_type(bprops, n_inputs, reg)
        if len(cands) == 1:
            type_name = cands[0]
        else:
            why = (f'ambiguous: could be {", ".join(cands)}' if cands else
                   f'no registered block has exactly the properties {sorted(bprops)}')
            if ctx.strict:
                raise ctx.error(where, f'layer {name!r} has no type and it cannot be inferred from its block '
                                       f'({why})', UnknownLayerTypeError)
            warnings.warn(f'{ctx.path}: layer {name!r}: type unknown ({why}); loaded as UnusableLayer')
            return UnusableLayer('dagnn.Layer', name, _generic_props(bprops, ctx, where), ctx.path,
                                 f'type not stored and not inferable: {why}')
    cls = reg.get(type_name)
    if cls is None:
        if ctx.strict:
            raise ctx.error(where, f'layer {name!r} has type {type_name!r}, which pydagnn does not implement '
                                   f'(known: {", ".join(sorted(reg))}); load with strict=False to load the rest',
                            UnknownLayerTypeError)
        warnings.warn(f'{ctx.path}: layer {name!r} has the unknown type {type_name!r}; loaded as UnusableLayer')
        return UnusableLayer(type_name, name, _generic_props(bprops, ctx, where), ctx.path, 'unknown type')
    props = {}
    for pname, raw in bprops.items():
        w = f'{where}.block.{pname}'
        if pname not in cls.properties:
            if ctx.strict:
                raise ctx.error(w, f'layer {name!r} ({type_name}): the block has no property {pname!r} '
                                   f'(known: {", ".join(cls.properties) or "none"})')
            warnings.warn(f'{ctx.path}: layer {name!r} ({type_name}): property {pname!r} dropped '
                          f'(the block does not have it)')
            continue
        props[pname] = _prop_from_mat(raw, cls.properties[pname], w, ctx.path)
    try:
        block = cls()
        block.load(props)
    except (ValueError, TypeError, KeyError) as err:
        raise ctx.error(where, f'layer {name!r} ({type_name}): bad block properties: {err}') from None
    return block


def _generic_props(bprops, ctx, where):
    return {k: _prop_from_mat(v, None, f'{where}.block.{k}', ctx.path) for k, v in bprops.items()}


# ---------------------------------------------------------------------------- SimpleNN
def _tidy(top, ctx, prefix):
    """vl_simplenn_tidy: meta, and the layers with their defaults filled."""
    meta = to_python(top['meta'], 'meta') if 'meta' in top else {}
    if not isinstance(meta, dict):
        meta = {'meta': meta}
    if 'classes' in top:
        meta['classes'] = to_python(top['classes'], 'classes')
    if 'normalization' in top:
        meta['normalization'] = to_python(top['normalization'], 'normalization')
    norm = meta.get('normalization')
    if isinstance(norm, dict) and 'cropSize' not in norm and 'border' in norm and 'imageSize' in norm:
        insz = np.asarray(norm['imageSize'], dtype=np.float64).reshape(-1)[:2]
        border = np.asarray(norm['border'], dtype=np.float64).reshape(-1)
        norm['cropSize'] = (insz / (insz + border)).reshape(1, -1)
    layers = []
    for l, item in enumerate(top['layers'].items):
        w = f'{prefix}layers{{{l + 1}}}'
        s = ctx.struct(item, w, ('type',))
        if s.size != 1:
            raise ctx.error(w, f'expected a 1x1 struct, got {_describe(s)}')
        layer = dict(s.elements[0])
        layer['type'] = ctx.string(layer['type'], f'{w}.type')
        layer.setdefault('name', f'layer{l + 1}')
        layer.setdefault('precious', False)
        t = layer['type']
        if t in ('conv', 'convt', 'bnorm') and 'weights' not in layer:
            layer['weights'] = MatCell([layer.get('filters', np.zeros((0, 0))),
                                        layer.get('biases', np.zeros((0, 0)))], (1, 2))
            layer.pop('filters', None)
            layer.pop('biases', None)
        if 'weights' not in layer:
            layer['weights'] = MatCell([], (0, 0))
        wts = layer['weights']
        if not isinstance(wts, MatCell):
            raise ctx.error(f'{w}.weights', f'expected a cell array, got {_describe(wts)}')
        if t == 'bnorm' and len(wts.items) < 3:
            c = np.asarray(wts.items[0]).size if wts.items else 0
            layer['weights'] = MatCell(list(wts.items) + [np.zeros((c, 2), np.float32)], (1, 3))
        defaults = {
            'conv': {'pad': 0, 'stride': 1, 'dilate': 1, 'opts': MatCell([], (0, 0))},
            # vl_simplenn_tidy's switch never reaches its second 'pool' case, so 'method' gets
            # no default there and fromSimpleNN would fail; vl_nnpool's default 'max' is used.
            'pool': {'pad': 0, 'stride': 1, 'opts': MatCell([], (0, 0)), 'method': 'max'},
            'convt': {'crop': 0, 'upsample': 1, 'numGroups': 1, 'opts': MatCell([], (0, 0))},
            'relu': {'leak': 0},
            'dropout': {'rate': 0.5},
            'normalize': {'param': np.array([[5, 1, 0.0001 / 5, 0.75]])},
            'lrn': {'param': np.array([[5, 1, 0.0001 / 5, 0.75]])},
            'bnorm': {'epsilon': 1e-5},
        }.get(t, {})
        for k, v in defaults.items():
            layer.setdefault(k, v)
        layers.append(layer)
    return meta, layers


def _num(v, where, ctx):
    if isinstance(v, (int, float)):
        return np.array([[float(v)]])
    if not isinstance(v, np.ndarray) or v.dtype.kind not in 'biuf':
        raise ctx.error(where, f'expected a number, got {_describe(v)}')
    return v


def _filter_prop(v, n, name):
    """What dagnn.Filter's setters store: pad as 4 numbers, stride/dilate as 2."""
    a = [float(x) for x in np.asarray(v, dtype=np.float64).reshape(-1, order='F')]
    if name == 'pad':
        if len(a) == 1:
            a = a * 4
        elif len(a) == 2:
            a = [a[0], a[0], a[1], a[1]]
    elif len(a) == 1:
        a = a * 2
    return np.array([a])


def from_simplenn(top, _ctx=None, _prefix=''):
    """A DagNN from a SimpleNN struct (a dict with ``layers``, a MatCell of 1x1 structs),
    following ``dagnn.DagNN.fromSimpleNN`` after ``vl_simplenn_tidy``: vars ``x0, x1, ...``,
    params ``<name>f``/``<name>b`` (conv) and ``<name>m``/``<name>b``/``<name>x`` (bnorm),
    a ``label`` input for the loss."""
    from ..dagnn import DagNN
    ctx = _ctx or _Ctx('<struct>', True)
    reg = _registry()
    meta, layers = _tidy(top, ctx, _prefix)
    net = DagNN()
    net.meta = meta

    def new_var_name(prefix):
        name, t = prefix, 0
        existing = {v.name for v in net.vars}
        while name in existing:
            t += 1
            name = f'{prefix}{t}'
        return name

    for l, layer in enumerate(layers):
        w = f'{_prefix}layers{{{l + 1}}}'
        t = layer['type']
        name = ctx.string(layer['name'], f'{w}.name')
        inputs = [f'x{l}']
        outputs = [f'x{l + 1}']
        pinfo = []  # (name, value, role)
        wts = layer['weights'].items
        lr = layer.get('learningRate')
        wd = layer.get('weightDecay')
        lr = None if lr is None else np.asarray(lr, dtype=np.float64).reshape(-1)
        wd = None if wd is None else np.asarray(wd, dtype=np.float64).reshape(-1)
        props = {}
        if t in ('conv', 'convt'):
            if len(wts) < 1 or not isinstance(wts[0], np.ndarray):
                raise ctx.error(f'{w}.weights', f'layer {name!r}: a {t} layer needs its filters')
            f = wts[0]
            b = wts[1] if len(wts) > 1 else np.zeros((0, 0))
            has_bias = isinstance(b, np.ndarray) and b.size > 0
            pinfo.append((f'{name}f', f, 'filter'))
            if has_bias:
                pinfo.append((f'{name}b', b, 'vector'))
            size = list(f.shape) + [1, 1, 1, 1]
            if t == 'conv':
                type_name = 'dagnn.Conv'
                props.update(size=np.array([size[:4]], dtype=np.float64),
                             pad=_filter_prop(_num(layer['pad'], f'{w}.pad', ctx), 4, 'pad'),
                             stride=_filter_prop(_num(layer['stride'], f'{w}.stride', ctx), 2, 'stride'),
                             dilate=_filter_prop(_num(layer['dilate'], f'{w}.dilate', ctx), 2, 'dilate'))
            else:
                type_name = 'dagnn.ConvTranspose'
                props.update(size=np.array([size[:4]], dtype=np.float64), upsample=layer['upsample'],
                             crop=layer['crop'], numGroups=layer['numGroups'])
            props['hasBias'] = np.array([[has_bias]])
            props['opts'] = layer['opts']
        elif t == 'pool':
            type_name = 'dagnn.Pooling'
            if 'pool' not in layer:
                raise ctx.error(w, f'layer {name!r}: a pool layer needs the field `pool`')
            props.update(method=layer['method'], poolSize=layer['pool'],
                         pad=_filter_prop(_num(layer['pad'], f'{w}.pad', ctx), 4, 'pad'),
                         stride=_filter_prop(_num(layer['stride'], f'{w}.stride', ctx), 2, 'stride'),
                         opts=layer['opts'])
        elif t in ('normalize', 'lrn'):
            type_name = 'dagnn.LRN'
            props['param'] = layer['param']
        elif t in ('spnorm', 'noffset'):
            # beta25's fromSimpleNN has no case for these two; mapped like 'lrn' (one
            # `param` property, no tidy default: vl_simplenn needs the field)
            type_name = 'dagnn.SpatialNorm' if t == 'spnorm' else 'dagnn.NormOffset'
            if 'param' not in layer:
                raise ctx.error(w, f'layer {name!r}: a {t} layer needs the field `param`')
            props['param'] = layer['param']
        elif t == 'dropout':
            type_name = 'dagnn.DropOut'
            props['rate'] = layer['rate']
        elif t == 'relu':
            type_name = 'dagnn.ReLU'
            props['leak'] = layer['leak']
        elif t == 'sigmoid':
            type_name = 'dagnn.Sigmoid'
        elif t == 'softmax':
            type_name = 'dagnn.SoftMax'
        elif t in ('softmaxloss', 'loss'):
            # fromSimpleNN knows only 'softmaxloss'; the generic 'loss' layer of later
            # vl_simplenn versions (field `loss`, default 'softmaxlog') is mapped the same way
            type_name = 'dagnn.Loss'
            props['loss'] = layer.get('loss', 'softmaxlog') if t == 'loss' else 'softmaxlog'
            inputs.append(new_var_name('label'))
        elif t == 'bnorm':
            type_name = 'dagnn.BatchNorm'
            if len(wts) < 2:
                raise ctx.error(f'{w}.weights', f'layer {name!r}: a bnorm layer needs gains and biases')
            pinfo += [(f'{name}m', wts[0], 'vector'), (f'{name}b', wts[1], 'vector'),
                      (f'{name}x', wts[2], 'moments')]
            # fromSimpleNN leaves numChannels empty and epsilon at the block's default;
            # both are filled in from the layer (tidy's epsilon default is 1e-5)
            if isinstance(wts[0], np.ndarray) and wts[0].size:
                props['numChannels'] = np.array([[float(wts[0].size)]])
            props['epsilon'] = _num(layer['epsilon'], f'{w}.epsilon', ctx)
        elif t == 'pdist':
            # fromSimpleNN has no case for it; vl_simplenn compares x with the layer's field
            # `class` (set before each call, like a loss's label): dagnn.PDist with the target
            # as a second input var; tidy's defaults (epsilon 1e-3, no aggregation)
            type_name = 'dagnn.PDist'
            for k, v in (('p', 2.0), ('noRoot', False), ('epsilon', 1e-3), ('aggregate', False)):
                props[k] = layer.get(k, v)
            iw = layer.get('instanceWeights')
            if isinstance(iw, np.ndarray) and iw.size:
                props['opts'] = MatCell(['instanceWeights', iw], (1, 2))
            inputs.append(new_var_name('class'))
        elif t == 'custom' and ctx.strict:
            raise ctx.error(w, f'layer {name!r} (SimpleNN layer {l + 1}) has the type {t!r}: custom layers '
                               'hold MATLAB function handles, which cannot be loaded; load with strict=False '
                               'to load the rest', UnknownLayerTypeError)
        else:
            if ctx.strict:
                raise ctx.error(w, f'layer {name!r} has the SimpleNN type {t!r}, which fromSimpleNN does not '
                                   'convert; load with strict=False to load the rest', UnknownLayerTypeError)
            type_name = f'simplenn.{t}'
        block = _make_block(name, type_name, props, len(inputs), ctx, w, reg)
        try:
            net.add_layer(name, block, inputs, outputs, [p[0] for p in pinfo])
        except (ValueError, KeyError) as err:
            raise ctx.error(w, f'layer {name!r}: {err}') from None
        for k, (pname, value, role) in enumerate(pinfo):
            param = net.get_param(pname)
            if isinstance(value, np.ndarray) and value.size:
                if value.dtype.kind not in 'biuf':
                    raise ctx.error(f'{w}.weights{{{k + 1}}}', f'expected a numeric array, got {_describe(value)}')
                try:
                    param.value = shape_by_role(value, role)
                except ValueError as err:
                    raise ctx.error(f'{w}.weights{{{k + 1}}}', f'param {pname!r} of layer {name!r}: {err}') from None
            if lr is not None and k < lr.size:
                param.learning_rate = float(lr[k])
            if wd is not None:
                if t == 'bnorm' and k == 2:
                    param.weight_decay = 0.0
                elif k < wd.size:
                    param.weight_decay = float(wd[k])
        if isinstance(block, Layer) and not isinstance(block, UnusableLayer):
            try:
                net.layers[-1].block.check_param_shapes([net.get_param(p[0]).value for p in pinfo],
                                                        net.layers[-1].params)
            except ValueError as err:
                raise ctx.error(w, f'layer {name!r}: {err}') from None

    inputs_meta = net.meta.get('inputs') if isinstance(net.meta, dict) else None
    if net.layers and inputs_meta:
        if isinstance(inputs_meta, dict):
            inputs_meta['name'] = net.layers[0].inputs[0]
        elif isinstance(inputs_meta, list) and inputs_meta and isinstance(inputs_meta[0], dict):
            inputs_meta[0]['name'] = net.layers[0].inputs[0]
    _finalize(net, ctx)
    return net


# ---------------------------------------------------------------------------- saving
def _param_to_mat(value, where):
    if value is None:
        return np.zeros((0, 0), dtype=np.float32)
    from .. import backend
    v = np.asarray(backend.to_host(value))
    if v.dtype.kind not in 'biufc':
        raise MatFileError(None, where, f'cannot save a param of type {v.dtype}')
    if v.ndim == 0:
        return v.reshape(1, 1)
    if v.ndim == 1:
        return v.reshape(-1, 1)
    return v


def net_to_struct(net):
    """The ``saveobj`` struct of a DagNN as ``{'vars', 'params', 'layers', 'meta'}``
    (MatStruct/MatCell/arrays, ready for :func:`pydagnn.io.matfile.write_mat`)."""
    vars_ = MatStruct.row(['name', 'precious'],
                          [{'name': v.name, 'precious': np.array([[bool(v.precious)]])} for v in net.vars])
    params = MatStruct.row(
        ['name', 'value', 'learningRate', 'weightDecay', 'trainMethod'],
        [{'name': p.name, 'value': _param_to_mat(p.value, f'param {p.name!r}'),
          'learningRate': np.array([[float(p.learning_rate)]]),
          'weightDecay': np.array([[float(p.weight_decay)]]),
          'trainMethod': str(p.train_method)} for p in net.params])
    layers = []
    for l in net.layers:
        block = l.block
        props = block.save()
        hints = getattr(type(block), 'properties', {})
        bstruct = MatStruct.scalar({k: _prop_to_mat(k, v, hints.get(k)) for k, v in props.items()})
        layers.append({
            'name': l.name,
            'type': block.type_name,
            'inputs': _cellstr(l.inputs),
            'outputs': _cellstr(l.outputs),
            'params': _cellstr(l.params),
            'block': bstruct,
        })
    layers = MatStruct.row(['name', 'type', 'inputs', 'outputs', 'params', 'block'], layers)
    meta = net.meta if net.meta is not None else {}
    return {'vars': vars_, 'params': params, 'layers': layers, 'meta': to_matlab(meta, 'meta')}


def _cellstr(names):
    return MatCell(list(names), (1, len(names))) if names else MatCell([], (0, 0))


def save_matconvnet(net, path, version='7', extra=None, compress=True):
    """Write ``net`` as the struct ``dagnn.DagNN.loadobj`` accepts.

    version: '7' (default; MATLAB v7, compressed unless ``compress=False``) or '7.3'
        (HDF5, readable by MATLAB).
    extra: more top-level variables (e.g. a checkpoint's ``state`` and ``stats``); when
        given, the net is written as the variable ``net`` beside them (the layout of
        ``net-epoch-N.mat``), otherwise as the top-level variables vars/params/layers/meta.
    The file is written under a temporary name in the same folder and renamed.
    """
    s = net_to_struct(net)
    if extra:
        extra = dict(extra)
        if 'net' in extra:
            raise ValueError("save_matconvnet: `extra` must not contain 'net'")
        variables = {'net': MatStruct.scalar(s)}
        variables.update(extra)
    else:
        variables = s
    write_mat(path, variables, version=version, compress=compress)

