"""Build the micro agent (agentopd/testbed/agent.py: the micro model warm-started on tool-use
demonstrations) into agentopd/testbed/micro_agent, what ``model.path: micro-agent`` loads.
    OMP_NUM_THREADS=1 python bench/micro_agent_build.py"""
import json
import sys

from agentopd.testbed.agent import AGENT_DIR, build_agent

if __name__ == "__main__":
    summary = build_agent(sys.argv[1] if len(sys.argv) > 1 else AGENT_DIR, progress=False)
    print(json.dumps(summary, indent=2))
