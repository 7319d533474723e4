"""Who serves what: the pure planner, the routes that what nodes hold form, and the
controller in the gateway that turns node reports into a plan and converges the nodes to it.

    planner     peers + model profile + policy -> Plan (pure)
    routes      what ready nodes hold -> routable replicas and pipelines (pure)
    reports     node Info -> the planner's input (pure)
    decide      current routes + a fresh plan -> the placement to hold (pure: keep, extend, switch)
    controller  the loop: claims, rounds on join/leave/failure, load and release calls
"""
