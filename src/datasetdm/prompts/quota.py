"""Per-class quotas on prompts: every class named by at least N of a run's prompts.

The DatasetDM paper counters a long-tailed few-shot set (§4, Table 7: head classes with 20 images,
tail classes with 2) by generating plenty of data for the rare classes, which text-guided
generation allows "simply by adjusting our prompts" (supplementary §5). ``QuotaPrompts`` does that
for any prompt source whose prompts carry their class mentions (``Prompt.classes``: a prompt
file's class prefixes or the class names found in its text, template prompts' classes):

1. classes are served rarest first (fewest prompts naming them in the pool; ties in the given
   order); a class below its quota takes, from a seeded shuffle of the prompts naming it (cycled
   when the quota is larger than that list), prompts until the samples planned so far name it N
   times (a prompt naming two classes counts for both);
2. the rest of the ``n`` samples follow the source's own order, as without a quota;
3. the whole plan is shuffled with the run seed, so the quota samples are spread over the run.

Everything depends on the seed, ``n``, the quota and the prompts only: a resumed run sees the same
prompt for every sample id. ``counts`` is the number of planned samples naming each class (what
the run records)."""

from __future__ import annotations

import random
from typing import Sequence

from datasetdm.errors import DatasetdmError
from datasetdm.io import sample_seed
from datasetdm.prompts.base import Prompt, PromptSource


class QuotaPrompts:
    def __init__(self, base: PromptSource, pool: Sequence[Prompt], classes: Sequence[str], n: int, quota: int,
                 seed: int = 0, where: str = "prompts"):
        if quota < 1:
            raise DatasetdmError(f"--class-quota {quota}: must be at least 1")
        if not pool:
            raise DatasetdmError(f"{where}: no prompts")
        self.base, self.n, self.quota, self.seed = base, int(n), int(quota), seed
        classes = list(classes)
        naming = {c: [i for i, p in enumerate(pool) if c in p.classes] for c in classes}
        missing = [c for c in classes if not naming[c]]
        if missing:
            raise DatasetdmError(f"{where}: no prompt names {', '.join(missing)}; --class-quota needs at least one "
                                 "prompt per class (or leave the class out of --classes)")
        counts = dict.fromkeys(classes, 0)
        picks: list[Prompt] = []
        for rank, c in enumerate(sorted(classes, key=lambda c: (len(naming[c]), classes.index(c)))):
            order = list(naming[c])
            random.Random(sample_seed(seed, rank, f"quota-{c}")).shuffle(order)
            k = 0
            while counts[c] < quota:
                prompt = pool[order[k % len(order)]]
                k += 1
                picks.append(prompt)
                for named in prompt.classes:
                    if named in counts:
                        counts[named] += 1
        if len(picks) > self.n:
            raise DatasetdmError(f"--class-quota {quota}: meeting it for {len(classes)} classes takes {len(picks)} "
                                 f"samples, more than --n {self.n}; ask for more samples or a smaller quota")
        plan = picks + [base.prompt(i) for i in range(self.n - len(picks))]
        for prompt in plan[len(picks):]:
            for named in prompt.classes:
                if named in counts:
                    counts[named] += 1
        random.Random(sample_seed(seed, 0, "quota-order")).shuffle(plan)
        self.plan = plan
        self.counts = counts
        self.quota_samples = len(picks)

    def prompt(self, sample_id: int) -> Prompt:
        if 0 <= sample_id < self.n:
            return self.plan[sample_id]
        return self.base.prompt(sample_id)  # beyond the planned run: the source's own order

    def record(self) -> dict:
        """What the run records (run.json config, the manifest's metadata)."""
        return {"quota": self.quota, "n": self.n, "quota_samples": self.quota_samples, "prompted": dict(self.counts)}
