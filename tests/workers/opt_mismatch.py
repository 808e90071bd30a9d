"""Worker: models that differ across workers must make EVERY rank raise at construction.

Rank 1 (only) builds a different model for each variant in `--what` (comma separated):
- "extra": an extra parameter at the end,
- "shape": `0.weight` with another shape,
- "dtype": `2.bias` in float64,
- "tau", "beta", "method", "mode": rank 1 wraps with another EASGD setting,
- "same": no difference (construction must succeed: the check is not over-eager).
Each rank writes, per variant, whether construction raised and the message. (The sync jobs of
tests/optim/test_optimizer.py run these variants as "mismatch" items, through `run_mismatch`.)
"""

import torch
import torch.nn as nn

from opt_common import error_text, hvd_easgd, init, parse_args, write


class Net(nn.Module):
    def __init__(self, variant: str, rank: int):
        super().__init__()
        differs = rank == 1
        hid = 9 if (differs and variant == "shape") else 8
        self.add_module("0", nn.Linear(6, hid))
        self.add_module("1", nn.Tanh())
        self.add_module("2", nn.Linear(hid, 3))
        if differs and variant == "dtype":
            self._modules["2"].bias.data = self._modules["2"].bias.data.double()
        if differs and variant == "extra":
            self.extra = nn.Parameter(torch.zeros(2))


def construct(variant: str, rank: int) -> dict:
    """Wrap this rank's model for one variant: whether construction raised, and the message."""
    model = Net(variant, rank)
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    settings = {"tau": 2, "beta": 0.9, "method": "easgd", "mode": "sync"}
    if rank == 1 and variant in settings:
        settings[variant] = {"tau": 3, "beta": 0.5, "method": "average", "mode": "async"}[variant]
    try:
        opt = hvd_easgd.ElasticOptimizer(base, named_parameters=model.named_parameters(),
                                         **settings)
    except Exception as exc:  # noqa: BLE001
        return {"raised": True, **error_text(exc)}
    opt.close()
    return {"raised": False}


def run_mismatch(item, rank):
    """A `--cases` item {"kind": "mismatch", "variant": ...} (tests/workers/opt_sync.py)."""
    return construct(item["variant"], rank)


def main():
    args = parse_args()
    rank, size = init()
    results = {variant: construct(variant, rank) for variant in args.what.split(",")}
    write(args.out, rank, {"rank": rank, "size": size, "results": results})


if __name__ == "__main__":
    main()
