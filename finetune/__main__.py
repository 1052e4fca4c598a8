"""`python -m finetune ...`"""

from finetune.cli import main

main()
