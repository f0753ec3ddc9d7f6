"""The main job's recipe and budget, as numbers the command line reads when it builds its parser (this module
imports nothing: `flash-experts --help` stays instant). contest/upcycling.py says what each one is for.

The MoE recipe (docs/UPCYCLING.md, "Routers that learn"): the routers at ROUTER_LR_SCALE x the rate of the rest
(a new matrix must move far within a few minutes), the Switch balancing loss at ROUTER_AUX_LOSS_COEF (keeps every
expert in use while the routers grow confident), and the routers' input detached (the routers learn, the
pretrained model below feels neither pull).
"""

ROUTER_LR_SCALE = 200.0
ROUTER_AUX_LOSS_COEF = 1.0
# The budget, in the dense model's training tokens: 88 steps of 8 windows of 64 tokens; every contender gets the
# same training FLOPs. --quick: 6 steps.
DEFAULT_TOKENS = 88 * 8 * 64
QUICK_TOKENS = 6 * 8 * 64
