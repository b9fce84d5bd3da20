"""Whole-network parity with the original MATLAB code.

Runs a saved original model on the inputs stored beside it (``shared/fixtures``) the way
the fixtures were made, and compares every stored value and derivative with pydagnn's,
as relative errors ``||a - b|| / ||b||`` grouped in tolerance tiers.

    python -m pydagnn.parity [--fixtures DIR] [--dtype float32|float64|both] [--layers-only]

prints, per dtype, the worst error per group of the layer fixtures (``fx_*.mat``, run by
``pydagnn.parity_layers``, always on the CPU), then of the whole network, and whether each
tolerance holds. The exit status is 1 when a float32 row is over its tolerance.
"""
import argparse
import os
import re
import sys

import numpy as np

from .cli import ArgumentParser, UsageError, add_debug_flag, run_main
from .testing import rel_err

#: group -> tolerance (relative error), the parity issue's tiers
TIERS = {
    'forward': 1e-4,          # prediction, objective, intermediates, H_x/gating/Balance_loss
    'head_der': 1e-3,         # prediction_*, fusion_bn_* (w, b), gating_w, gating_noise_w
    'below_isqrt_der': 3e-2,  # CM convs, gating convs/BNs, trunk, der_input
    'moments_der': 1e-4,      # BN moments "derivative" (batch moments x N)
    'exact': 0.0,             # selection masks, error counts
}

_HEAD = re.compile(r'^(prediction_[fb]|fusion_bn_bn_[wb]|gating_w|gating_noise_w)$')


def der_group(param_name):
    if param_name.endswith('_bn_m'):
        return 'moments_der'
    if _HEAD.match(param_name):
        return 'head_der'
    return 'below_isqrt_der'


def _host(x):
    from .backend import to_host
    return to_host(x)


def cast_net(net, dtype):
    """Cast every param value to ``dtype`` in place."""
    for p in net.params:
        if p.value is not None:
            p.value = p.value.astype(dtype)


def run_gmsop(model_path, io, dtype=np.float32, conserve_memory=True, device='cpu'):
    """Evaluate ``gmsop_resnet18_eval.mat`` as the fixtures were made.

    Returns ``(test_net_values, normal_values, net)``: dicts of var name -> value after the
    test pass and the normal pass (with derivatives), and the net after the normal pass.
    """
    from .io.matconvnet import load_matconvnet
    net = load_matconvnet(model_path)
    cast_net(net, dtype)
    if device == 'gpu':
        net.move('gpu')
    x = io['input'].astype(dtype)
    label = io['label'].astype(dtype).ravel()
    recorded = ['conv1_relu', 'conv5_2', 'gating_Cov_ScaleTr', 'CM_1_Cov_ScaleTr', 'Fusion_out',
                'fusion_bn', 'dropout', 'H_x', 'gating', 'Balance_loss', 'prediction', 'objective',
                'top1error', 'top5error']

    net.reset()
    net.mode = 'test'
    net.conserve_memory = False
    net.eval({'input': x, 'label': label})
    test_vals = {n: _host(net.get_var(n).value) for n in recorded}

    net.reset()
    net.mode = 'normal'
    net.conserve_memory = conserve_memory
    for n in recorded:
        net.get_var(n).precious = True
    net.get_layer('H_x').block.noise = io['gamma_normal'].ravel()
    net.get_layer('dropout').block.mask = io['normal_dropout_mask'].astype(dtype)
    net.eval({'input': x, 'label': label}, {'objective': 1})
    normal_vals = {n: _host(net.get_var(n).value) for n in recorded}
    normal_vals['der_input'] = _host(net.get_var('input').der)
    for p in net.params:
        normal_vals['der_' + p.name] = _host(p.der)
    return test_vals, normal_vals, net


def _tuple_parts(values, prefix, mode):
    out = {}
    for name, parts in (('H_x', 2), ('gating', 6), ('Balance_loss', 3)):
        v = values[name]
        for k in range(parts):
            out[f'{mode}_{name}_{k + 1}'] = v[k]
    return out


def compare_gmsop(io, test_vals, normal_vals):
    """Rows ``(fixture variable, group, rel_err or mismatch count, tolerance)``."""
    rows = []
    for mode, vals in (('test', test_vals), ('normal', normal_vals)):
        flat = {f'{mode}_{n}': v for n, v in vals.items() if not isinstance(v, tuple)
                and not n.startswith('der_')}
        flat.update(_tuple_parts(vals, mode, mode))
        for key, ref in sorted(io.items()):
            if not key.startswith(mode + '_') or key.endswith('_time'):
                continue
            mine = flat.get(key)
            if key.endswith(('_4', '_5')) and key.startswith(f'{mode}_gating_'):
                rows.append((key, 'exact', 0 if mine is None else 1, 0))
                continue
            if key.endswith('dropout_mask'):
                continue
            if key.endswith('gating_2'):
                rows.append((key, 'exact', int(np.sum(np.asarray(mine, bool) != ref.astype(bool))), 0))
            elif key.endswith(('top1error', 'top5error')):
                rows.append((key, 'exact', float(abs(float(np.sum(mine)) - float(ref.sum()))), 0))
            elif key.endswith('H_x_2'):
                rows.append((key, 'forward', rel_err(mine, ref) if np.any(ref) else
                             float(np.abs(np.asarray(mine)).max()), TIERS['forward']))
            else:
                rows.append((key, 'forward', rel_err(mine, ref), TIERS['forward']))
    rows += compare_ders(io, normal_vals)
    return rows


def compare_ders(io, vals, prefix='der_'):
    rows = []
    filt = vals.get('der_conv1_f')
    for key, ref in sorted(io.items()):
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        if name == 'prediction_f_cols':
            cols = io['der_prediction_f_colidx'].ravel().astype(int) - 1
            mine = np.asarray(vals['der_prediction_f'])[:, :, :, cols]
            rows.append((key, 'head_der', rel_err(mine, ref), TIERS['head_der']))
        elif name == 'prediction_f_colidx':
            continue
        elif name == 'input':
            rows.append((key, 'below_isqrt_der', rel_err(vals['der_input'], ref), TIERS['below_isqrt_der']))
        elif ref.size == 0:  # a CM no image selected: no derivative at all
            rows.append((key, 'exact', 0 if vals.get(key) is None else 1, 0))
        elif name == 'conv1_b':  # zero by construction (BN follows): relative to the filter's scale
            d = np.linalg.norm(np.asarray(vals[key], np.float64) - ref.ravel())
            rows.append((key + ' (vs |der_conv1_f|)', 'below_isqrt_der',
                         float(d / np.linalg.norm(filt)), TIERS['below_isqrt_der']))
        else:
            g = der_group(name)
            rows.append((key, g, rel_err(vals[key], ref), TIERS[g]))
    return rows


def worst_by_group(rows):
    """group -> ``(name, err, tol)`` of its worst row, groups in the order they first
    appear: the largest error among the rows over their tolerance (NaN counts as over and
    largest) when there is one, else the largest error. A group mixes tolerances (a value
    and an exact check), so the largest error alone could hide a row that fails."""
    worst, keys = {}, {}
    for name, group, err, tol in rows:
        over = not err <= tol
        key = (over, float('inf') if err != err else err)
        if group not in worst or key > keys[group]:
            worst[group], keys[group] = (name, err, tol), key
    return worst


def print_table(title, rows, show_all=False, sort_groups=False, file=None):
    """Print ``title``, then (with ``show_all``) every row, then the worst row per group.
    Returns whether every group holds its tolerance."""
    print(title, file=file)
    if show_all:
        for r in rows:
            print(f'  {r[0]:40s} {r[1]:16s} {r[2]:.3g} (tol {r[3]:g})', file=file)
    worst = worst_by_group(rows)
    held_all = True
    for group in (sorted(worst) if sort_groups else worst):
        name, err, tol = worst[group]
        held = err <= tol
        held_all &= held
        exact = [r[2] for r in rows if r[1] == group and r[3] == 0]
        note = f'  exact checks {sum(e == 0 for e in exact)}/{len(exact)} hold' if exact else ''
        print(f'  {group:16s} worst {err:10.3g}  tol {tol:8.1g}  {"ok " if held else "OVER"}'
              f'  ({name}){note}', file=file)
    return held_all


def make_parser():
    """The argparse parser of the command (every flag with a help line)."""
    from .testing import shared_dir
    ap = ArgumentParser(prog='python -m pydagnn.parity', description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--fixtures', default=os.path.join(shared_dir(), 'fixtures'),
                    help='folder of the original\'s fixtures (default $PYDAGNN_SHARED/fixtures, '
                         'else ../shared/fixtures beside the checkout)')
    ap.add_argument('--dtype', default='both', choices=['float32', 'float64', 'both'],
                    help='precision of the comparison (default both)')
    ap.add_argument('--device', default='cpu', choices=['cpu', 'gpu'],
                    help='where the whole network runs (the layer fixtures run on the CPU)')
    ap.add_argument('--layers-only', action='store_true',
                    help='only the layer fixtures (fx_*.mat), not the whole network')
    ap.add_argument('--all', action='store_true',
                    help='print every row, not only the worst per group')
    add_debug_flag(ap)
    return ap


def check_fixtures(folder, need_net=True):
    """Raise :class:`~pydagnn.cli.UsageError` saying how to point at the fixtures when
    ``folder`` is not a folder of them."""
    how = ('the fixtures come with the project\'s shared folder: give --fixtures DIR or set '
           'PYDAGNN_SHARED=/path/to/shared (holding fixtures/)')
    if not os.path.isdir(folder):
        raise UsageError(f'--fixtures {folder}: no such folder; {how}')
    names = os.listdir(folder)
    if not any(n.startswith('fx_') and n.endswith('.mat') for n in names):
        raise UsageError(f'--fixtures {folder}: holds no fx_*.mat fixtures; {how}')
    if need_net:
        for n in ('gmsop_resnet18_eval.mat', 'gmsop_resnet18_eval_io.mat'):
            if n not in names:
                raise UsageError(f'--fixtures {folder}: no {n} (use --layers-only to compare '
                                 'the layer fixtures alone)')


def main(argv=None):
    """The command: prints the tables, returns 0 when every float32 tolerance holds, else
    1. Raises :class:`~pydagnn.cli.UsageError` when the fixtures are not found."""
    args = make_parser().parse_args(argv)
    check_fixtures(args.fixtures, need_net=not args.layers_only)
    from . import parity_layers
    if not args.layers_only:
        import scipy.io   # here, not at the top: --help answers without it
        io = scipy.io.loadmat(os.path.join(args.fixtures, 'gmsop_resnet18_eval_io.mat'))
        model = os.path.join(args.fixtures, 'gmsop_resnet18_eval.mat')
    dtypes = ['float32', 'float64'] if args.dtype == 'both' else [args.dtype]
    ok = True
    for dt in dtypes:
        rows = parity_layers.layer_rows(args.fixtures, np.dtype(dt))
        held = print_table(f'== Layer fixtures (fx_*.mat) vs the original ({dt}, cpu) ==', rows,
                           args.all)
        ok &= held or dt != 'float32'
        if args.layers_only:
            continue
        t, n, _ = run_gmsop(model, io, np.dtype(dt), device=args.device)
        rows = compare_gmsop(io, t, n)
        held = print_table(f'== GM-SOP ResNet18 vs the original ({dt}, {args.device}) ==', rows,
                           args.all, sort_groups=True)
        ok &= held or dt != 'float32'
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(run_main(main))
