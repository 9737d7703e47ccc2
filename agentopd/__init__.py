"""agentopd: train LLM agents with reinforcement learning from environment feedback."""
__version__ = "0.1.0"
