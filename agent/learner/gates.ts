import si from 'systeminformation';
import type { StopReason } from './train.js';

/**
 * Resource gates: local training yields to the device's real job. A gate that trips stops
 * training at the next step; the update from the steps taken so far is still sent, marked with
 * the reason, and the fleet decides whether it counts.
 */

export interface GateLimits {
  /** Largest share (0..1) of all cores busy with work other than training. */
  maxCpuLoad: number;
  /** Hottest CPU temperature allowed, where the board has a sensor. */
  maxTemperatureC: number;
  /** Lowest battery charge allowed while not charging, where there is a battery. */
  minBatteryPercent: number;
}

/** One look at the device. null: the device has no such sensor (most boards have no battery). */
export interface GateReading {
  /** Busy share of all cores, 0..1, over the last interval, training included. */
  cpuLoad: number | null;
  temperatureC: number | null;
  battery: { percent: number; charging: boolean } | null;
}

/** The first gate the reading trips, given the share of all cores training itself took. */
export function trippedGate(reading: GateReading, limits: GateLimits, trainingCpuShare: number): StopReason | null {
  if (reading.temperatureC !== null && reading.temperatureC > limits.maxTemperatureC) return 'temperature';
  if (reading.battery && !reading.battery.charging && reading.battery.percent < limits.minBatteryPercent) return 'battery';
  if (reading.cpuLoad !== null && reading.cpuLoad - trainingCpuShare > limits.maxCpuLoad) return 'cpu';
  return null;
}

/** Reads the gates from systeminformation; a probe that fails or has no sensor gives null. */
export async function readGates(): Promise<GateReading> {
  const [load, temp, battery] = await Promise.all([
    si.currentLoad().catch(() => null),
    si.cpuTemperature().catch(() => null),
    si.battery().catch(() => null),
  ]);
  const t = temp?.max ?? temp?.main;
  return {
    cpuLoad: load && Number.isFinite(load.currentLoad) ? load.currentLoad / 100 : null,
    temperatureC: typeof t === 'number' && Number.isFinite(t) && t > -100 && t < 250 ? t : null,
    battery: battery?.hasBattery ? { percent: battery.percent, charging: battery.isCharging || battery.acConnected } : null,
  };
}
