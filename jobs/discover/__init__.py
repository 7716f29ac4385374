"""The discovery job (`python launch.py --discover`): `job` drives it, `worker` computes a shard, `outputs`
writes OUT/discovery."""
