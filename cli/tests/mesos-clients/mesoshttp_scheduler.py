"""A Mesos framework written with mesoshttp (PyPI), run against an Agora master by
cli/tests/all/mesos_clients.rs.

It subscribes, launches three command tasks on its first offer (one finishes, one exits 3,
one sleeps until it is killed), declines later offers with a filter, kills the sleeper once it
runs, reconciles it, and tears the framework down once every task has ended. mesoshttp
acknowledges each update itself. The last line it prints is RESULT and a JSON summary.
"""

import json
import sys
import threading

from mesoshttp.client import MesosClient

TERMINAL = {"TASK_FINISHED", "TASK_FAILED", "TASK_KILLED", "TASK_ERROR", "TASK_LOST", "TASK_DROPPED"}
TASKS = {"hello": "echo hello from mesoshttp", "fails": "exit 3", "sleeps": "exec sleep 600"}

client = MesosClient(mesos_urls=[sys.argv[1]], frameworkUser="", frameworkName="mesoshttp-test")
client.set_failover_timeout(30)
client.add_capability("PARTITION_AWARE")

state = {"driver": None, "agent": None, "launched": False, "declined": 0, "killed": False,
         "reconciled": [], "updates": [], "ends": {}}
lock = threading.Lock()
done = threading.Event()


def resources(cpus, mem):
    return [{"name": "cpus", "type": "SCALAR", "scalar": {"value": cpus}},
            {"name": "mem", "type": "SCALAR", "scalar": {"value": mem}}]


def on_subscribed(driver):
    state["driver"] = driver
    print("SUBSCRIBED", client.frameworkId, flush=True)


def on_offers(offers):
    for offer in offers:
        with lock:
            first = not state["launched"]
            state["launched"] = True
        if not first:
            offer.decline({"filters": {"refuse_seconds": 1.0}})
            state["declined"] += 1
            continue
        agent = offer.get_offer()["agent_id"]
        state["agent"] = agent["value"]
        tasks = [{"name": name, "task_id": {"value": name}, "agent_id": agent,
                  "resources": resources(0.1, 32), "command": {"value": command}}
                 for name, command in TASKS.items()]
        offer.accept(tasks, {"filters": {"refuse_seconds": 1.0}})


def on_update(update):
    status = update["status"]
    task, task_state = status["task_id"]["value"], status["state"]
    state["updates"].append([task, task_state])
    if status.get("reason") == "REASON_RECONCILIATION":
        state["reconciled"].append([task, task_state])
    driver = state["driver"]
    if task == "sleeps" and task_state == "TASK_RUNNING" and not state["killed"]:
        state["killed"] = True
        driver.reconcile([{"task_id": {"value": "sleeps"}, "agent_id": {"value": state["agent"]}}])
        driver.kill(state["agent"], "sleeps")
    if task_state in TERMINAL:
        state["ends"][task] = task_state
    if set(state["ends"]) == set(TASKS):
        done.set()


client.on(MesosClient.SUBSCRIBED, on_subscribed)
client.on(MesosClient.OFFERS, on_offers)
client.on(MesosClient.UPDATE, on_update)
threading.Thread(target=client.register, daemon=True).start()

finished = done.wait(60)
if state["driver"] is not None:
    state["driver"].tearDown()
summary = {k: state[k] for k in ("declined", "killed", "reconciled", "updates", "ends")}
summary["framework_id"] = client.frameworkId
summary["finished"] = finished
print("RESULT", json.dumps(summary), flush=True)
sys.exit(0 if finished else 1)
