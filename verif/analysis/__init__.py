"""The analysis: statistics, figures and weight comparisons over what the model side produced."""
