"""The same networks in plain PyTorch, timed like bench_train_gpu.py: the reference for
pydagnn's GPU throughput and memory.

  python benchmarks/torch_baseline.py --model ResNet18-GM-SOP --batch 256 --cudnn-benchmark both
  python benchmarks/torch_baseline.py --model ResNet18-GAP --batch 256
  python benchmarks/torch_baseline.py --model WRN-36-2-GM-SOP --batch 150

Networks (pydagnn.models.build's layout, NCHW here): the ResNet18 trunk of the 64x64
models (conv1 3x3/16 with bias + BN + ReLU; four stages of ``section_len`` basic blocks,
widths 16/32/64/128 times ``width``; stride 2 on the first block of stages 3, 4 and, for
GAP heads, 5; a 1x1 conv + BN adapter on the first block of stages 3-5, or of every stage
for WRN), then

* GAP: 8x8 average pooling, 1x1 conv (linear) to the classes;
* GM-SOP: gating module (1x1 conv-BN-ReLU layers of ``gating_widths``, iSQRT-COV:
  covariance pooling, trace normalisation, 3 Newton-Schulz iterations, upper triangle,
  times sqrt(trace)), ``H_x`` (``Wg'x + gamma * softplus(Wn'x)``, gamma ~ N(0, 1) per
  image), top-k gating with a softmax over the selected scores, the balance loss
  (``100 * (std/mean)^2`` of the per-CM weight sums); ``cm_num`` component modules
  (1x1 conv-ReLU layers of ``cm_widths`` without BN, iSQRT-COV), each run on the images
  routed to it by the top-k selection (one argsort of the mask and the per-CM counts
  fetched once per step, as pydagnn does), the weighted fusion, BN, dropout, 1x1 conv
  to the classes;
* loss: summed softmax cross-entropy (MatConvNet's) + the balance loss.

fp32 with TF32 off (``torch.backends.cuda.matmul.allow_tf32`` and
``torch.backends.cudnn.allow_tf32`` False), ``cudnn.benchmark`` on and/or off. A step is
forward + backward + SGD (momentum 0.9, weight decay 1e-4). Timing: CUDA events around
each step, the median of ``--iters`` timed steps after ``--warmup``. Memory:
``torch.cuda.max_memory_allocated`` over a step (params, grads and momentum included),
and ``max_memory_reserved``. Prints JSON lines (``kind`` train, ``framework`` torch).
``--device cpu`` runs the same code on the CPU (for checking the script; no timing
worth reading).
"""
import argparse
import json
import sys
import time

MODELS = {
    'ResNet18-GAP': dict(gm=False, order=1, section_len=2, width=1, adapt_all=False),
    'ResNet18-SR-SOP': dict(gm=False, order=2, section_len=2, width=1, adapt_all=False),
    'ResNet18-GM-GAP': dict(gm=True, order=1, section_len=2, width=1, adapt_all=False,
                            gating_widths=(256, 128), cm_widths=(512,), dropout=0.2),
    'ResNet18-GM-SOP': dict(gm=True, order=2, section_len=2, width=1, adapt_all=False,
                            gating_widths=(256, 128), cm_widths=(256, 128), dropout=0.2),
    'WRN-36-2-GM-GAP': dict(gm=True, order=1, section_len=4, width=2, adapt_all=True,
                            gating_widths=(512,), cm_widths=(512,), dropout=0.2),
    'WRN-36-2-GM-SOP': dict(gm=True, order=2, section_len=4, width=2, adapt_all=True,
                            gating_widths=(512, 128), cm_widths=(512, 128), dropout=0.4),
}


def build_model(torch, model, num_classes=1000, cm_num=16, topk=8, loss_w=100.0, image_size=64):
    nn = torch.nn
    F = torch.nn.functional
    cfg = MODELS[model]

    def conv_bn(cin, cout, k, stride=1, relu=True, bias=False):
        layers = [nn.Conv2d(cin, cout, k, stride=stride, padding=(k - 1) // 2, bias=bias), nn.BatchNorm2d(cout)]
        if relu:
            layers.append(nn.ReLU(inplace=True))
        return nn.Sequential(*layers)

    class Basic(nn.Module):
        def __init__(self, cin, cout, stride, adapt):
            super().__init__()
            self.a = conv_bn(cin, cout, 3, stride)
            self.b = conv_bn(cout, cout, 3, 1, relu=False)
            self.adapt = conv_bn(cin, cout, 1, stride, relu=False) if adapt else None

        def forward(self, x):
            s = self.adapt(x) if self.adapt is not None else x
            return F.relu(self.b(self.a(x)) + s)

    def isqrt_cov(x, iter_n=3):
        """iSQRT-COV of (n, C, H, W) -> (n, C(C+1)/2)."""
        n, C, H, W = x.shape
        M = H * W
        X = x.reshape(n, C, M)
        Xc = X - X.mean(dim=2, keepdim=True)
        P = Xc @ Xc.transpose(1, 2) / M
        tr = P.diagonal(dim1=1, dim2=2).sum(1)
        A = P / tr[:, None, None]
        I3 = 3.0 * torch.eye(C, device=x.device, dtype=x.dtype)
        T = 0.5 * (I3 - A)
        Y = A @ T
        Z = T
        for _ in range(1, iter_n - 1):
            T = 0.5 * (I3 - Z @ Y)
            Y = Y @ T
            Z = T @ Z
        Y = 0.5 * Y @ (I3 - Z @ Y)
        r, c = torch.triu_indices(C, C, device=x.device)
        return Y[:, r, c] * tr.sqrt()[:, None]

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            w, L = cfg['width'], cfg['section_len']
            self.conv1 = conv_bn(3, 16, 3, bias=True)
            blocks, cin = [], 16
            for s in range(2, 6):
                depth = 2 ** (s + 2) * w
                down = s in (3, 4) or (s == 5 and cfg['order'] == 1)
                for l in range(1, L + 1):
                    adapt = l == 1 and (cfg['adapt_all'] or s > 2)
                    blocks.append(Basic(cin, depth, 2 if (down and l == 1) else 1, adapt))
                    cin = depth
            self.trunk = nn.Sequential(*blocks)
            self.pool = image_size // 8
            if not cfg['gm']:
                d = cin * (cin + 1) // 2 if cfg['order'] == 2 else cin
                self.prediction = nn.Conv2d(d, num_classes, 1)
                return
            g, d = [], cin
            for gw in cfg['gating_widths']:
                g.append(conv_bn(d, gw, 1))
                d = gw
            self.gating = nn.Sequential(*g)
            dg = d * (d + 1) // 2 if cfg['order'] == 2 else d
            # ones / dg as pydagnn's H_x.init_params, perturbed by 1% so that the top-k
            # selection is not one big tie (both benchmarks do this)
            self.wg = nn.Parameter((1 + 0.01 * torch.randn(dg, cm_num)) / dg)
            self.wn = nn.Parameter((1 + 0.01 * torch.randn(dg, cm_num)) / dg)
            cms = []
            for _ in range(cm_num):
                layers, d = [], cin
                for cw in cfg['cm_widths']:
                    layers += [nn.Conv2d(d, cw, 1, bias=False), nn.ReLU(inplace=True)]
                    d = cw
                cms.append(nn.Sequential(*layers))
            self.cms = nn.ModuleList(cms)
            dc = d * (d + 1) // 2 if cfg['order'] == 2 else d
            self.dc = dc
            self.fusion_bn = nn.BatchNorm1d(dc)
            self.dropout = nn.Dropout(cfg['dropout'])
            self.prediction = nn.Linear(dc, num_classes)

        def head(self, x):
            if cfg['order'] == 2:
                return isqrt_cov(x)
            return F.avg_pool2d(x, self.pool).flatten(1)

        def forward(self, x):
            x = self.trunk(self.conv1(x))
            if not cfg['gm']:
                z = self.head(x)
                return self.prediction(z[:, :, None, None]).flatten(1), None
            v = self.head(self.gating(x))                            # (N, dg)
            gamma = torch.randn(x.shape[0], 1, device=x.device, dtype=x.dtype)
            H = v @ self.wg + gamma * F.softplus(v @ self.wn)       # (N, K)
            K = H.shape[1]
            sel = torch.topk(H, topk, dim=1).indices
            mask = torch.zeros_like(H, dtype=torch.bool).scatter_(1, sel, True)   # exactly k per image
            Hm = torch.where(mask, H, torch.full_like(H, float('-inf')))
            s = torch.softmax(Hm, dim=1)                            # 0 where unselected
            w_sum = s.sum(0)
            rsd = w_sum.std() / w_sum.mean()
            bal = loss_w * rsd * rsd
            # routing: one sort, one host read of the counts
            N = x.shape[0]
            ar = torch.arange(N, device=x.device)
            keys = torch.where(mask.t(), ar[None, :], N + ar[None, :])
            order = torch.argsort(keys, dim=1)
            counts = mask.sum(0).tolist()
            z = x.new_zeros(N, self.dc)
            for i in range(K):
                if counts[i] == 0:
                    continue
                idx = order[i, :counts[i]]
                y = self.head(self.cms[i](x.index_select(0, idx)))
                z = z.index_add(0, idx, y * s[idx, i:i + 1])
            z = self.dropout(self.fusion_bn(z))
            return self.prediction(z), bal

    return Net()


def run(args, cudnn_benchmark):
    import numpy as np
    import torch
    dev = torch.device('cuda' if args.device == 'gpu' else 'cpu')
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = bool(cudnn_benchmark)
    torch.manual_seed(args.seed)
    net = build_model(torch, args.model, num_classes=args.num_classes).to(dev)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    rng = np.random.default_rng(args.seed + 1)
    x = torch.tensor((rng.standard_normal((args.batch, 3, 64, 64)) * 50).astype(np.float32), device=dev)
    y = torch.tensor(rng.integers(0, args.num_classes, args.batch), device=dev)
    net.train()

    def step():
        opt.zero_grad(set_to_none=True)
        out, bal = net(x)
        loss = torch.nn.functional.cross_entropy(out, y, reduction='sum')
        if bal is not None:
            loss = loss + bal
        loss.backward()
        opt.step()

    gpu = dev.type == 'cuda'
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    sync()
    warm = time.perf_counter() - t0
    times = []
    if gpu:
        torch.cuda.reset_peak_memory_stats()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(args.iters):
        if gpu:
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            step()
            times.append(time.perf_counter() - t)
    med = float(np.median(times))
    rec = {'kind': 'train', 'framework': 'torch', 'model': args.model, 'device': args.device,
           'card': torch.cuda.get_device_name() if gpu else 'cpu', 'torch': torch.__version__,
           'cudnn_benchmark': bool(cudnn_benchmark), 'tf32': False, 'batch': args.batch,
           'iters': args.iters, 'warmup': args.warmup, 'images_per_s': round(args.batch / med, 2),
           'step_s_median': round(med, 4), 'step_s_all': [round(t, 4) for t in times],
           'warmup_s': round(warm, 2),
           'params': sum(p.numel() for p in net.parameters())}
    if gpu:
        rec['peak_mem_mb'] = round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
        rec['reserved_mem_mb'] = round(torch.cuda.max_memory_reserved() / 2 ** 20, 1)
    print(json.dumps(rec), flush=True)
    del net, opt, x, y
    if gpu:
        torch.cuda.empty_cache()
    return rec


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--model', default='ResNet18-GM-SOP', choices=sorted(MODELS))
    ap.add_argument('--batch', type=int, default=256)
    ap.add_argument('--iters', type=int, default=5)
    ap.add_argument('--warmup', type=int, default=2)
    ap.add_argument('--num-classes', type=int, default=1000)
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--device', default='gpu', choices=['gpu', 'cpu'])
    ap.add_argument('--cudnn-benchmark', default='both', choices=['on', 'off', 'both'])
    args = ap.parse_args(argv)
    modes = {'on': [True], 'off': [False], 'both': [True, False]}[args.cudnn_benchmark]
    for m in modes:
        run(args, m)
    return 0


if __name__ == '__main__':
    sys.exit(main())
