//! Pacemaker CIB import (work in progress).
