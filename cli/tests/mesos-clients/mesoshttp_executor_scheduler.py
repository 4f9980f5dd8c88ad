"""A Mesos framework written with mesoshttp (PyPI) whose tasks run in a custom executor written
with mesos-framework (npm), run against an Agora master by cli/tests/all/mesos_clients.rs.

argv: the master's URL, the executor script's path, and the NODE_PATH it needs. On its first
offer it launches two tasks in one executor, fetched by a file:// URI: "works", which the
executor finishes, and "waits", which it keeps until killed. The framework kills "waits" once
it runs, and tears down once both have ended. The last line it prints is RESULT and a JSON
summary, with the data of each task's last update (what the executor saw).
"""

import base64
import json
import sys
import threading

from mesoshttp.client import MesosClient

TERMINAL = {"TASK_FINISHED", "TASK_FAILED", "TASK_KILLED", "TASK_ERROR", "TASK_LOST", "TASK_DROPPED"}
master, script, node_path = sys.argv[1], sys.argv[2], sys.argv[3]
TASKS = {"works": "finish", "waits": "wait"}

client = MesosClient(mesos_urls=[master], frameworkUser="", frameworkName="mesos-executor-test")
client.set_failover_timeout(30)

state = {"driver": None, "agent": None, "launched": False, "killed": False, "updates": [],
         "ends": {}, "seen": {}, "messages": []}
lock = threading.Lock()
done = threading.Event()

EXECUTOR = {
    "executor_id": {"value": "node-executor"},
    "name": "mesos-framework executor",
    "command": {
        "value": "exec node " + script.rsplit("/", 1)[-1],
        "uris": [{"value": "file://" + script}],
        "environment": {"variables": [{"name": "NODE_PATH", "value": node_path}]},
    },
}


def on_subscribed(driver):
    state["driver"] = driver


def on_offers(offers):
    for offer in offers:
        with lock:
            first = not state["launched"]
            state["launched"] = True
        if not first:
            offer.decline({"filters": {"refuse_seconds": 1.0}})
            continue
        agent = offer.get_offer()["agent_id"]
        state["agent"] = agent["value"]
        tasks = [{"name": name, "task_id": {"value": name}, "agent_id": agent,
                  "resources": [{"name": "cpus", "type": "SCALAR", "scalar": {"value": 0.1}},
                                {"name": "mem", "type": "SCALAR", "scalar": {"value": 96}}],
                  "executor": EXECUTOR,
                  "data": base64.b64encode(what.encode()).decode()}
                 for name, what in TASKS.items()]
        offer.accept(tasks, {"filters": {"refuse_seconds": 1.0}})


def on_update(update):
    status = update["status"]
    task, task_state = status["task_id"]["value"], status["state"]
    state["updates"].append([task, task_state, status.get("source")])
    if task == "waits" and task_state == "TASK_RUNNING" and not state["killed"]:
        state["killed"] = True
        state["driver"].kill(state["agent"], "waits")
    if task_state in TERMINAL:
        state["ends"][task] = task_state
        if "data" in status:
            state["seen"][task] = json.loads(base64.b64decode(status["data"]))
    if set(state["ends"]) == set(TASKS) and state["messages"]:
        done.set()


def on_message(message):
    state["messages"].append([message["executor_id"]["value"],
                              base64.b64decode(message["data"]).decode()])
    if set(state["ends"]) == set(TASKS):
        done.set()


client.on(MesosClient.SUBSCRIBED, on_subscribed)
client.on(MesosClient.OFFERS, on_offers)
client.on(MesosClient.UPDATE, on_update)
# mesoshttp has no on() for MESSAGE, but dispatches it to this list.
client.callbacks["MESSAGE"] = [on_message]
threading.Thread(target=client.register, daemon=True).start()

finished = done.wait(60)
if state["driver"] is not None:
    state["driver"].tearDown()
summary = {k: state[k] for k in ("killed", "updates", "ends", "seen", "messages")}
summary["framework_id"] = client.frameworkId
summary["finished"] = finished
print("RESULT", json.dumps(summary), flush=True)
sys.exit(0 if finished else 1)
