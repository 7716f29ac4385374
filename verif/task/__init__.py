"""The task: Countdown problems, attempts (generated, or taken from chains of thought) and their
validator, TinyZero's generation prompt and reward, and the verification prompt built from them."""
