"""The model: families (where heads and neurons are), loading, ablation of heads at the attention
output projection's input and of neurons at the MLP down projection's input, the fast forward pass
and the hook path, the worker's self-check, and Yes/No scoring."""
