error("this module is broken")
