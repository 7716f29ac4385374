"""Discovery: ranking attention heads and MLP neurons by how much they matter to the Yes/No verdict.

The study picked its 29 heads by eye from attention plots and its value vectors by cosine with a
linear probe. These modules compute those two heuristics and two effect estimates for every
component of a model, and test what the top of each ranking buys against random sets:

* `metric`: the objective M (mean log-odds of Yes over No) and which prompts it averages;
* `sums`: per-prompt sums that shards compute and a driver adds (M is a mean: divide once);
* `inputs`: length-sorted, left-padded batches;
* `atp`: attribution patching, one forward and one backward per batch for every head and neuron;
* `exact`: exact zero-ablation effects through the sweep's engine (the one adapter to it);
* `attention`: the study's head heuristic, attention from the last position to the target number;
* `neurons`: the direct Yes-minus-No logit of each value vector;
* `probes`: per-layer logistic-regression probes and the value vectors' cosine with them;
* `ranking`: ordering components by a score, rank and linear correlation;
* `sets`: top-k sets of a ranking against random sets of the same size, and the target YAML;
* `tables`, `figures`: the output tables and plots.
"""
