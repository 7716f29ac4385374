"""The task: Countdown problems, solution attempts, and the verification prompt built from them."""
