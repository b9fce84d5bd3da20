"""The short table gpu_check.sh prints: img/s of pydagnn and PyTorch per model, their
ratio, peak memory of both, pydagnn's per-layer split, and the worst GPU-vs-CPU
relative errors of the tests.

  python benchmarks/gpu_report.py OUT/bench.jsonl [OUT/gpu_rel_err.json]
"""
import json
import sys


def _load(path):
    recs = []
    try:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line.startswith('{'):
                    try:
                        recs.append(json.loads(line))
                    except ValueError:
                        pass
    except OSError:
        pass
    return recs


def main(argv):
    recs = _load(argv[1]) if len(argv) > 1 else []
    card = next((r.get('card') for r in recs if r.get('card')), '?')
    print(f'\n=== pydagnn vs PyTorch, training step (forward + backward + SGD), fp32, TF32 off; card: {card}')
    rows = [('model', 'batch', 'pydagnn img/s', 'torch img/s (cudnn.bm on/off)', 'ratio', 'peak MiB pydagnn',
             'peak MiB torch', 'pool MiB', 'torch reserved')]
    models = []
    for r in recs:
        if r.get('kind') == 'train' and (r['model'], r['batch']) not in models:
            models.append((r['model'], r['batch']))
    for model, batch in models:
        mine = [r for r in recs if r.get('kind') == 'train' and r.get('framework') == 'pydagnn'
                and r['model'] == model and r['batch'] == batch]
        th = [r for r in recs if r.get('kind') == 'train' and r.get('framework') == 'torch'
              and r['model'] == model and r['batch'] == batch]
        p = mine[0] if mine else {}
        on = next((r for r in th if r.get('cudnn_benchmark')), {})
        off = next((r for r in th if not r.get('cudnn_benchmark')), {})
        best = max([r.get('images_per_s', 0) for r in th] or [0])
        ratio = (p.get('images_per_s', 0) / best) if best and p else None
        tpeak = min([r['peak_mem_mb'] for r in th if 'peak_mem_mb' in r] or [None]) if th else None
        tres = min([r['reserved_mem_mb'] for r in th if 'reserved_mem_mb' in r] or [None]) if th else None
        rows.append((model, str(batch), str(p.get('images_per_s', '-')),
                     f"{on.get('images_per_s', '-')} / {off.get('images_per_s', '-')}",
                     f'{ratio:.2f}' if ratio else '-', str(p.get('peak_mem_mb', '-')), str(tpeak or '-'),
                     str(p.get('pool_total_mb', '-')), str(tres or '-')))
    w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print('  '.join(s.ljust(x) for s, x in zip(r, w)))
    for r in recs:
        if r.get('kind') == 'split':
            print(f"\n{r['model']} (pydagnn, synchronised per-layer clocks): layers {r['layer_total_s_per_iter']*1e3:.1f} ms"
                  f"/step of {r.get('profiled_wall_s_per_iter', 0)*1e3:.1f} ms profiled wall "
                  f"(unprofiled step {r['wall_s_per_iter']*1e3:.1f} ms); CM share {r['cm_share']}, GM share {r['gm_share']}")
            bt = list(r.get('by_type_s_per_iter', {}).items())[:8]
            print('  by type (ms/step): ' + ', '.join(f'{k} {v*1e3:.1f}' for k, v in bt))
        if r.get('kind') == 'top_layers':
            print(f"  top layers of {r['model']} (fwd ms, bwd ms, share):")
            for name, typ, f, b, sh in r['layers'][:8]:
                print(f'    {name:28s} {typ:28s} {f:8.2f} {b:8.2f} {sh}')
        if r.get('kind') == 'test':
            print(f"  {r['model']} forward-only (test mode): {r['forward_test_images_per_s']} img/s")
    if len(argv) > 2:
        try:
            with open(argv[2]) as f:
                worst = json.load(f)
            print('\nGPU vs CPU (tests/test_gpu.py), largest relative errors:')
            for k, v in sorted(worst.items(), key=lambda kv: -kv[1])[:12]:
                print(f'  {v:10.3g}  {k}')
        except (OSError, ValueError):
            print('\n(no GPU test report)')
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv))
