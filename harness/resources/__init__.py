"""What a run needs from the machine (memory per device, disk) and tools to keep the stage cache in bounds."""
