"""The model: loading, ablation at the o_proj input, the fast forward pass and Yes/No scoring."""
