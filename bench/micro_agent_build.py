"""Build the micro agent (agentopd/testbed/agent.py: the micro model warm-started on tool-use
demonstrations) into agentopd/testbed/micro_agent, what ``model.path: micro-agent`` loads, or OUT.
``--shapes``: the shares of the three demonstration shapes (answer at once, test then answer, test a
wrong attempt then repair).
    OMP_NUM_THREADS=1 python bench/micro_agent_build.py [OUT] [--shapes 0.3,0.3,0.4]"""
import argparse
import json

from agentopd.testbed.agent import AGENT_DIR, AgentRecipe, build_agent

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("out", nargs="?", default=AGENT_DIR)
    ap.add_argument("--shapes", default="0.3,0.3,0.4")
    a = ap.parse_args()
    recipe = AgentRecipe(shapes=tuple(float(x) for x in a.shapes.split(",")))
    print(json.dumps(build_agent(a.out, recipe, progress=False), indent=2))
