"""Worker for ``horovodrun -np 1``: one EASGD worker against plain SGD on the same problem.

For each mode (sync, async) it trains ``tests.reference``'s problem (the one ``--cases`` case) with the local optimizer
alone and with ``hvd_easgd.ElasticOptimizer`` around a twin of it, and reports both runs'
parameters, the center, and alpha/beta as the optimizer states them.
"""

from opt_common import Case, build, cases_from, init, parse_args, write
from tests.reference import build_model, build_optimizer, flat, local_backward


def main():
    args = parse_args()
    [CASE] = cases_from(args)
    rank, _ = init()
    plain_model = build_model(CASE, rank)
    plain = build_optimizer(CASE, plain_model.parameters())
    for t in range(1, CASE.steps + 1):
        local_backward(plain_model, plain, CASE, rank, t)
        plain.step()
    out = {"plain": flat(plain_model.parameters())}
    for mode in ("sync", "async"):
        case = Case.from_dict({**CASE.to_dict(), "mode": mode})
        model, _, opt = build(case, rank)
        for t in range(1, case.steps + 1):
            local_backward(model, opt, case, rank, t)
            opt.step()
        opt.synchronize()
        out[mode] = {"params": flat(model.parameters()), "alpha": opt.alpha, "beta": opt.beta,
                     "center": flat(opt.center_state_dict()[n] for n, _ in model.named_parameters()),
                     "rounds": opt.round_count}
        opt.close()
    write(args.out, rank, out)


if __name__ == "__main__":
    main()
